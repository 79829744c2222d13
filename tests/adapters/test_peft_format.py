"""LoRA adapters in PEFT's format: ours, trained a few steps, load into PEFT on the transformers
Llama with our logits; a PEFT-made adapter loads into ours with PEFT's logits."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.adapters.lora import LoraSpec, add_lora, lora_filter
from research.adapters.peft_format import load_peft_adapter, read_peft_config, save_peft_adapter
from research.models.llama_hf import load_hf_llama
from tests.models.test_llama import save_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = np.random.default_rng(0).integers(0, 100, (2, 16))


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny random transformers Llama on disk, and ours loaded from it."""
    save_tiny_llama(tmp_path / "base", tie=False)
    return str(tmp_path / "base"), load_hf_llama(str(tmp_path / "base"))[1]


def hf_llama(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def relative_error(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


def train_lora(model, steps=3):
    """A few Adam steps of next-token loss on the adapter only, so that A and B both matter."""
    graphdef, params, rest = nnx.split(model, lora_filter(), ...)
    tx = optax.adam(3e-2)
    opt = tx.init(params)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p, rest, copy=True)(jnp.asarray(TOKENS[:, :-1]))  # as research.core.train
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(TOKENS[:, 1:])).mean()

    for _ in range(steps):
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
    nnx.update(model, params)


def test_our_trained_adapter_loads_in_peft_with_our_logits(tmp_path, checkpoint):
    base_dir, model = checkpoint
    add_lora(model, LoraSpec(r"attn/(q|v)$", rank=4, alpha=8.0, dropout=0.1), rngs=nnx.Rngs(1))
    train_lora(model)
    model.eval()
    out = save_peft_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=base_dir)
    config = read_peft_config(out)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["target_modules"]) == (
        4, 8.0, 0.1, ["q_proj", "v_proj"])
    peft_model = peft.PeftModel.from_pretrained(hf_llama(base_dir), out).eval()
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(TOKENS)).logits.numpy()
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            without = plain(torch.as_tensor(TOKENS)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(TOKENS))[0])
    assert relative_error(ours, theirs) <= 1e-5
    assert relative_error(ours, without) > 1e-3          # the adapter changes the output


def test_a_peft_made_adapter_loads_into_ours_with_peft_logits(tmp_path, checkpoint):
    base_dir, model = checkpoint
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_llama(base_dir), config)
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero: give it values, as training would
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = peft_model.eval()(torch.as_tensor(TOKENS)).logits.numpy()
    paths = load_peft_adapter(model, str(tmp_path / "adapter"), rngs=nnx.Rngs(0))
    assert sorted(paths) == ["segments/0/attn/q", "segments/0/attn/v", "segments/0/mlp/down"]
    model.eval()
    assert relative_error(np.asarray(model(jnp.asarray(TOKENS))[0]), theirs) <= 1e-5


def test_unsupported_adapters_fail_naming_the_field_and_leave_the_model_unchanged(tmp_path, checkpoint):
    base_dir, model = checkpoint
    peft.get_peft_model(hf_llama(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
                        ).save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(model, str(tmp_path / "dora"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_peft_adapter(model, str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(model, str(tmp_path), rngs=nnx.Rngs(0))
    from safetensors.numpy import load_file, save_file

    peft.get_peft_model(hf_llama(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "extra"))
    weights = load_file(str(tmp_path / "extra" / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = np.zeros(32, np.float32)
    save_file(weights, str(tmp_path / "extra" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lora_B.bias"):
        load_peft_adapter(model, str(tmp_path / "extra"), rngs=nnx.Rngs(0))
    assert not any("lora" in "/".join(map(str, p)) for p, _ in nnx.iter_graph(model))


def test_an_upcycled_mla_models_adapter_is_refused(tmp_path, checkpoint):
    from research.upcycling import UpcycleConfig, upcycle_gqa_to_mla

    student, _ = upcycle_gqa_to_mla(checkpoint[1], UpcycleConfig(kv_rank=4, rope_dim=4, rope_mode="uniform"))
    add_lora(student, LoraSpec(r"attn/o$", rank=2), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="Llama \\(GQA\\) layers only"):
        save_peft_adapter(student, str(tmp_path / "adapter"))
