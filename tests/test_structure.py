"""The code's shape that a newcomer relies on: one module names each output file, every
step is one function that the command and the pipeline both call, and renamed modules
still import (with a warning)."""

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "volttl"
FILE_NAME = re.compile(r"[A-Za-z0-9_<>{}-]+\.(json|jsonl|md|csv|png|pt|pt2|yaml|nii\.gz|mrml|dcm|log|pkl)")


def _string_literals(tree: ast.AST):
    """Every string literal, an f-string with ``{}`` where its fields go."""
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def test_no_output_file_name_is_spelt_in_two_modules():
    where: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for text in _string_literals(ast.parse(path.read_text())):
            if FILE_NAME.fullmatch(text.strip()):
                where.setdefault(text.strip(), set()).add(str(path.relative_to(PACKAGE)))
    assert {"cam_summary.json", "localisation.json", "search_table.md", "svcca.json", "report.json",
            "best.pt", "metrics_{}.json"} <= set(where)  # the scan sees the names it is about
    repeated = {name: sorted(mods) for name, mods in where.items() if len(mods) > 1}
    assert repeated == {}


STEPS = {  # step: (module, function); the command and the pipeline step call the same one
    "preprocess": ("volttl.preprocess.step", "preprocess_step"),
    "train": ("volttl.train.step", "train_step"),
    "evaluate": ("volttl.evaluate.step", "evaluate_step"),
    "cam": ("volttl.explain.step", "cam_step"),
    "predict": ("volttl.predict.step", "predict_step"),
    "search": ("volttl.search.step", "search_step"),
    "svcca": ("volttl.analysis.step", "svcca_step"),
    "pretrain": ("volttl.pretrain.step", "pretrain_step"),
    "report": ("volttl.pipeline.report", "report_step"),
    "synth": ("volttl.synth.step", "synth_step"),
    "manifest": ("volttl.manifests.step", "manifest_step"),
}


def test_every_step_lives_in_its_stage_packages_step_module():
    """A newcomer looks for a command's code in ``volttl/<stage>/step.py`` and finds it there
    (a pipeline's own report step lives with the pipeline)."""
    for step, (module, _) in STEPS.items():
        assert module.endswith(".step") or step == "report", module
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "config", "errors", "inference", "numerics", "progress",
                   "reference_pages", "study_result"], top


@pytest.mark.parametrize("step", sorted(STEPS))
def test_the_command_and_the_pipeline_call_the_same_step_function(step):
    module, function = STEPS[step]
    assert callable(getattr(importlib.import_module(module), function))
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    runner = ast.parse((PACKAGE / "pipeline" / "runner.py").read_text())

    def calls(tree: ast.AST, name: str) -> set[str]:
        """The functions called inside function ``name`` of ``tree``."""
        fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
        return {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}

    if step != "report":  # a pipeline's own step
        assert function in calls(cli, f"cmd_{step}")
    if step != "predict":  # a pipeline scores no new scans
        assert function in calls(runner, f"_{step}")


@pytest.mark.parametrize("old", ["volttl.preprocess.run", "volttl.explain.run", "volttl.analysis.svcca_run"])
def test_the_old_step_modules_are_gone(old):
    """Scaffolding down (version 0.1.0, no release): one name per step module."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    import volttl.predict
    import volttl.search

    assert not hasattr(volttl.search, "search_run") and not hasattr(volttl.predict, "predict_run")


def test_only_a_manifest_written_by_synth_counts_as_a_synthetic_cohort(cohort, tmp_path):
    import shutil

    from volttl.outputs.folders import SynthDir

    made = SynthDir.of_manifest(cohort)
    assert made == {"synthetic": True, "made_by": "volttl synth", "studies": 6, "seed": 3, "matrix": 96}
    mine = tmp_path / "labels.csv"  # a user's manifest, even of the same studies
    shutil.copyfile(cohort, mine)
    assert SynthDir.of_manifest(mine) is None
    shutil.copyfile(cohort, tmp_path / "manifest.csv")  # a manifest.csv with no cohort record beside it
    assert SynthDir.of_manifest(tmp_path / "manifest.csv") is None
    (tmp_path / "cohort.json").write_text("{not json")  # a damaged record is named, not a traceback
    from volttl.errors import VolttlError

    with pytest.raises(VolttlError, match=r"cohort\.json: unreadable"):
        SynthDir.of_manifest(tmp_path / "manifest.csv")


def _module_imports() -> dict[str, set[str]]:
    """Every volttl module and the volttl modules it imports anywhere in its body (imports
    inside functions included: they hide a loop from Python, not from a reader)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                found = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def test_no_module_imports_itself_through_others():
    """No import loop among volttl's modules: a module that needs another's work imports
    it, and the other does not import it back (two loops hid behind imports inside
    functions: evaluate <-> train.repeats and train.loop <-> train.pseudo)."""
    graph = _module_imports()
    assert {"volttl.train.step", "volttl.evaluate.step"} <= set(graph)
    loops = []
    for start in graph:  # a path back to the start through the import graph
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    loops.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert not loops, "import loops:\n" + "\n".join(sorted(set(loops))[:10])


# names that look like files but are not outputs: what volttl reads, and the layout of
# files a user's tool or MONAI writes
NOT_OUTPUT_NAMES = {"train.csv"}  # RSNA's label file, an input (volttl/manifests/rsna.py)
OUTPUT_NAME = re.compile(r"^[\w{}\-/. ]*[\w}]\.(json|jsonl|csv|md|png|pt|pt2|pth|yaml|h5|nii\.gz|dcm|mrml|"
                         r"log|lock|ctbl)$")


def test_no_module_but_outputs_spells_an_output_file_name():
    """Every output file's name is spelt once, in volttl/outputs/folders.py: a string in any other
    module that reads as a file name (``x.json``, ``f"{study}_cam.nii.gz"``) is a second
    spelling that can drift from the first."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "outputs" / "folders.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and OUTPUT_NAME.match(node.value) and node.value not in NOT_OUTPUT_NAMES:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}")
    assert not found, "file names spelt outside outputs/folders.py:\n" + "\n".join(found)


def test_the_name_check_sees_plain_and_formatted_names():
    for name in ("trial.json", "_cam.nii.gz", "models/package.json", "profile.md", "{sid}_lesion.nii.gz"):
        assert OUTPUT_NAME.match(name), name
    for not_a_name in (".json", ".nii.gz", "*.dcm", "a sentence ending in file.", "json"):
        assert not OUTPUT_NAME.match(not_a_name), not_a_name


def test_every_import_inside_volttl_names_what_exists():
    """Imports inside functions run only when their branch does: a name moved to another
    module breaks them silently until a user takes that branch. Each ``from volttl.x import
    y`` anywhere in the package must name a module or attribute that exists."""
    missing = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and \
                    (node.module or "").startswith("volttl"):
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.module}.{alias.name}"
                            for alias in node.names if not _exists(module, alias.name)]
    assert not missing, missing


def _exists(module, name: str) -> bool:
    if hasattr(module, name):
        return True
    try:  # a submodule not imported yet
        return importlib.util.find_spec(f"{module.__name__}.{name}") is not None
    except ModuleNotFoundError:  # module is not a package
        return False


def test_the_import_check_sees_a_moved_name():
    import volttl.search.trials as trials

    assert _exists(trials, "read_trial") and not _exists(trials, "RESULT")
    import volttl.explain as explain

    assert _exists(explain, "gradcam") and not _exists(explain, "run")
