"""The CAM path (run dir -> NIfTI) stays out of training, search and analysis code."""

import json
import subprocess
import sys


def test_cam_path_imports_no_training_search_or_analysis_module():
    code = ("import json, sys\nfrom volttl.explain.step import cam_step\nimport volttl.inference\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('volttl'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "volttl.explain.step" in loaded and "volttl.inference" in loaded
    outside = [m for m in loaded if m.split(".")[1:2] in (["train"], ["search"], ["analysis"], ["pipeline"])]
    assert outside == []
    assert "volttl.data.dataset" not in loaded  # Grad-CAM needs the intensity scaling only
