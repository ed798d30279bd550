import subprocess
import sys


def test_import_hfgen_loads_every_component_but_no_training_or_test_dependency():
    code = (
        "import sys, hfgen\n"
        "assert hfgen.VAEModel and hfgen.VAEPipeline and hfgen.ConditionalPipeline and hfgen.AutoPipeline\n"
        "heavy = [m for m in ('hfgen.training', 'tensorboard', 'sklearn', 'mlxtend', 'datasets', 'pytest') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
