"""transformers capture: a tiny random Llama in float32 as the reference against the same
model in bfloat16 and with weights fake-quantized to int8 / int4; every statistic checked
against the float64 oracle (reference.py) on the logits the models produced."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fidelity_kld import reference  # noqa: E402
from fidelity_kld.capture import hf  # noqa: E402
from fidelity_kld.io import open_source  # noqa: E402
from fidelity_kld.io._util import to_float32  # noqa: E402

VOCAB = 128
LENGTHS = (16, 24, 9, 30, 20, 12, 2)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64, initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    ref = tiny_llama()
    out = {"bf16": copy.deepcopy(ref).to(torch.bfloat16)}
    for bits in (8, 4):
        out[f"int{bits}"] = hf.fake_quantize_weights(copy.deepcopy(ref), bits)
    return ref, out


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def read(path):
    with open_source(str(path)) as src:
        lg = src.read(0, src.n_tokens)
        return to_float32(np.asarray(lg.data), lg.dtype), src.labels, src.prompt_ids


def assert_matches_oracle(st, ref_logits, q_logits, labels):
    want = reference.logit_stats(ref_logits, q_logits, labels)
    for name in ("kld", "kld_reverse", "entropy_ref", "nll_ref", "nll_q", "lse_ref", "lse_q"):
        np.testing.assert_allclose(getattr(st, name), want[name], rtol=1e-4, atol=2e-6, err_msg=name)
    np.testing.assert_array_equal(st.top1_ref, want["top1_ref"])
    np.testing.assert_array_equal(st.top1_q, want["top1_q"])


@pytest.mark.parametrize("variant", ["bf16", "int8", "int4"])
def test_statistics_match_the_oracle_on_the_dumped_logits(tmp_path, models, sequences, variant):
    ref, quants = models
    q = quants[variant]
    rd, qd = tmp_path / "ref.safetensors", tmp_path / f"{variant}.npy"
    acc = hf.compare_models(ref, q, hf.token_batches(sequences, batch_size=3, prompt_ids=range(100, 107)),
                            ref_dump=rd, q_dump=qd)
    ref_logits, labels, pids = read(rd)
    q_logits, q_labels, q_pids = read(qd)
    st = acc.token_stats()
    n = sum(x - 1 for x in LENGTHS)
    assert st.n_tokens == ref_logits.shape[0] == q_logits.shape[0] == n
    want_labels = np.concatenate([s[1:] for s in sequences])
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(q_labels, want_labels)
    np.testing.assert_array_equal(st.labels, want_labels)
    np.testing.assert_array_equal(pids, np.repeat(np.arange(100, 107), [x - 1 for x in LENGTHS]))
    np.testing.assert_array_equal(q_pids, pids)
    assert_matches_oracle(st, ref_logits, q_logits, labels)
    table = acc.per_prompt()
    np.testing.assert_array_equal(table["n_tokens"], [x - 1 for x in LENGTHS])


def test_kld_orders_int4_above_int8_above_bf16(models, sequences):
    ref, quants = models
    means = {name: hf.compare_models(ref, q, hf.token_batches(sequences, batch_size=4)).summary().kld.mean
             for name, q in quants.items()}
    assert means["int4"] > means["int8"] > means["bf16"] > 0, means


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  initializer_range=0.1)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("arch,padding_side", [("llama", "left"), ("llama", "right"), ("gpt2", "left")])
def test_padding_matches_each_sequence_run_alone(models, sequences, arch, padding_side):
    """Independent check of masking, label shift and position ids: a padded batch gives the
    statistics of each sequence run unbatched through plain model(ids).logits. (GPT-2's
    absolute positions catch left padding without position ids; RoPE would not notice.)"""
    if arch == "llama":
        ref, q = models[0], models[1]["int8"]
    else:
        ref, q = tiny_gpt2(0), tiny_gpt2(1)  # two random models: any pair will do here
    acc = hf.compare_models(ref, q, hf.token_batches(sequences, batch_size=4, padding_side=padding_side,
                                                     pad_token_id=5))
    with torch.no_grad():
        a = np.concatenate([ref(torch.tensor([s])).logits[0, :-1].numpy() for s in sequences])
        b = np.concatenate([q(torch.tensor([s])).logits[0, :-1].numpy() for s in sequences])
    labels = np.concatenate([s[1:] for s in sequences])
    st = acc.token_stats()
    np.testing.assert_array_equal(st.labels, labels)
    want = reference.logit_stats(a, b, labels)
    # batching changes float32 summation order: logits agree to ~1e-6, not bitwise
    np.testing.assert_allclose(st.kld, want["kld"], rtol=2e-3, atol=1e-8)
    np.testing.assert_allclose(st.nll_ref, want["nll_ref"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(acc.per_prompt()["n_tokens"], [x - 1 for x in LENGTHS])


def test_labels_minus_100_and_score_from_select_the_scored_tokens(models, sequences):
    """A training-style batch (labels = -100 on the prompt) scores the answer tokens only."""
    ref, quants = models
    q = quants["int4"]
    first = [min(5, len(s) - 1) for s in sequences]
    acc = hf.compare_models(ref, q, hf.token_batches(sequences, batch_size=7, score_from=first))
    st = acc.token_stats()
    np.testing.assert_array_equal(st.labels, np.concatenate([s[f:] for s, f in zip(sequences, first)]))
    full = hf.compare_models(ref, q, hf.token_batches(sequences, batch_size=7)).token_stats()
    keep = np.concatenate([np.arange(1, len(s)) >= f for s, f in zip(sequences, first)])
    np.testing.assert_allclose(st.kld, full.kld[keep], rtol=1e-5, atol=1e-9)


def test_prompt_ids_per_token_and_a_plain_model_output_tuple(models):
    ref, quants = models
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]])
    batch = {"input_ids": ids, "prompt_ids": torch.tensor([[1, 1, 2, 2], [3, 3, 3, 4]])}
    ref_rows, q_rows, labels, pids = hf.batch_rows(ref, quants["bf16"], batch)
    np.testing.assert_array_equal(labels, [4, 5, 6, 8, 9, 0])
    np.testing.assert_array_equal(pids, [1, 2, 2, 3, 3, 4])  # the target token's prompt
    assert ref_rows.shape == (6, VOCAB) and q_rows.dtype == torch.bfloat16


def test_fake_quantize_is_per_channel_symmetric_round_to_nearest():
    model = tiny_llama(3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hf.fake_quantize_weights(model, 4)
    for name, p in model.named_parameters():
        w0, w = before[name], p.detach()
        if not name.endswith("proj.weight") and name != "lm_head.weight":
            assert torch.equal(w, w0), name  # embeddings and norms untouched
            continue
        scale = w0.abs().amax(dim=1, keepdim=True) / 7
        levels = w / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4), name
        assert levels.abs().max() <= 7 + 1e-4
        assert torch.all((w - w0).abs() <= scale / 2 + 1e-7), name
        assert all(len(torch.unique(row)) <= 15 for row in w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_models_on_the_gpu_give_the_cpu_statistics(models, sequences):
    pytest.importorskip("fidelity_kld.gpu")
    ref, quants = models
    cpu = hf.compare_models(ref, quants["int8"], hf.token_batches(sequences)).token_stats()
    gpu = hf.compare_models(copy.deepcopy(ref).cuda(), copy.deepcopy(quants["int8"]).cuda(),
                            hf.token_batches(sequences)).token_stats()
    np.testing.assert_allclose(gpu.kld, cpu.kld, rtol=1e-2, atol=1e-6)
    np.testing.assert_array_equal(gpu.labels, cpu.labels)
