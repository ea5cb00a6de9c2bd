"""Multi-step studies described as data (`volttl pipeline FILE.yaml`)."""

from volttl.pipeline.runner import PipelineError, run_pipeline

__all__ = ["PipelineError", "run_pipeline"]
