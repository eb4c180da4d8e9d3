"""Model directories whose config transformers cannot build from its own code are refused up front."""

import json
import subprocess
import sys

import pytest

from mergescale.errors import ModelError
from mergescale.eval.architecture import check_architecture

QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}
CUSTOM = {
    **QWEN2,
    "architectures": ["MyLMForCausalLM"],
    "model_type": "mylm",
    "auto_map": {"AutoConfig": "configuration_mylm.MyLMConfig", "AutoModelForCausalLM": "modeling_mylm.MyLM"},
}


def model_dir(tmp_path, config, name="model"):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def test_a_qwen2_config_passes(tmp_path):
    check_architecture(model_dir(tmp_path, QWEN2))
    check_architecture(str(model_dir(tmp_path, {k: v for k, v in QWEN2.items() if k != "architectures"}, "bare")))


@pytest.mark.parametrize(
    "config, message",
    [
        (None, "not a Hugging Face model directory (no config.json)"),
        ('{"model_type": "qwen2",', "config.json: not valid JSON"),
        ("[1, 2]", "config.json: not a JSON object"),
        (CUSTOM, "auto_map (AutoConfig, AutoModelForCausalLM) needs the model's own Python code; convert it to a "
                 "supported architecture, or pass --trust-remote-code if you trust its code"),
        ({**QWEN2, "model_type": "qwen_nonexistent"}, "model_type 'qwen_nonexistent', which transformers does not"),
        ({k: v for k, v in QWEN2.items() if k != "model_type"}, "has no model_type"),
        ({**QWEN2, "architectures": ["Qwen2ForCausalLMX"]}, "architectures ['Qwen2ForCausalLMX'] are not classes"),
        ({**QWEN2, "architectures": "Qwen2ForCausalLM"}, "architectures is not a list of class names"),
    ],
)  # fmt: skip
def test_a_config_transformers_cannot_build_is_one_line_naming_the_directory(tmp_path, config, message):
    path = tmp_path / "model"
    if config is None:
        path.mkdir()
    else:
        model_dir(tmp_path, config)
    with pytest.raises(ModelError) as err:
        check_architecture(path)
    text = str(err.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text
    if isinstance(config, dict):
        assert "convert it to" in text  # the fix


def test_custom_code_is_accepted_only_when_trusted(tmp_path):
    path = model_dir(tmp_path, CUSTOM)
    check_architecture(path, trust_remote_code=True)
    with pytest.raises(ModelError, match="--trust-remote-code"):
        check_architecture(path, trust_remote_code=False)


def test_the_check_imports_no_model_code(tmp_path):
    path = model_dir(tmp_path, QWEN2)
    code = (
        "import sys\nfrom mergescale.eval.architecture import check_architecture\n"
        f"check_architecture({str(path)!r})\n"
        "print([m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_eval_refuses_a_custom_code_model_before_any_engine_starts(tmp_path):
    path = model_dir(tmp_path, CUSTOM)
    res = subprocess.run(
        [sys.executable, "-m", "mergescale.cli", "--log", str(tmp_path / "eval.log"), "eval", str(path), "--tasks",
         "zoo_upper"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mergescale: error: ") and str(path) in lines[0] and "--trust-remote-code" in lines[0]
    log = (tmp_path / "eval.log").read_text()
    assert " eval " in log and "Ray" not in log, "refused before Ray or an engine started"
