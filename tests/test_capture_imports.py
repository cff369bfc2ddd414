"""Every capture module imports without its framework: torch, transformers, lm_eval,
vllm and llama_cpp are imported inside functions only."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "lm_eval", "vllm", "llama_cpp", "pyarrow")


def test_capture_modules_import_no_framework():
    code = (
        "import sys\n"
        "import fidelity_kld.capture.hf, fidelity_kld.capture.llama_cpp, fidelity_kld.capture.vllm\n"
        "import fidelity_kld.capture.lm_eval, fidelity_kld.capture.dump\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
