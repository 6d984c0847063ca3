"""Chapter 04: pruning, quantization, distillation, and saving/loading compressed models."""
import copy
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from recbook.compress import (Int8Embedding, RowwiseInt8Linear, apply_head_pruning, distill_bi_encoder, drop_layers,
                              evenly_spaced, export_onnx, head_importance, int8_matmul, int8_kernel, load_compressed, magnitude_prune, OnnxBiEncoder,
                              prune_ffn, prune_heads, quantize_int8, quantize_rows, save_compressed, sparsity_of)
from recbook.core import model_size
from recbook.model import BiEncoder

TEXTS = ["a light summer dress with pockets", "warm wool sweater", "jeans"]


from conftest import tiny_bert


@pytest.fixture()
def tiny(tokenizer):
    return BiEncoder(tiny_bert(tokenizer, hidden=48, layers=4, heads=4, ffn=96), tokenizer, doc_max_length=64)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8])
def test_magnitude_prune_hits_the_sparsity_and_keeps_the_original(tiny, sparsity):
    before = copy.deepcopy(tiny.state_dict())
    pruned = magnitude_prune(tiny, sparsity)
    assert sparsity_of(pruned) == pytest.approx(sparsity, abs=2e-3)
    assert model_size(pruned).parameters == model_size(tiny).parameters
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k])  # the input model is untouched
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(tiny, 1.0)


def test_magnitude_prune_removes_the_smallest_weights(tiny):
    pruned = magnitude_prune(tiny, 0.5)
    from recbook.compress import encoder_linears
    kept, removed = [], []
    for (a, _), (b, _) in zip(encoder_linears(tiny), encoder_linears(pruned)):
        kept.append(a.weight[b.weight != 0].abs()); removed.append(a.weight[b.weight == 0].abs())
    assert torch.cat(removed).max() <= torch.cat(kept).min() + 1e-7


@given(st.integers(1, 6), st.integers(1, 6))
def test_evenly_spaced_layers(n, keep):
    keep = min(keep, n)
    layers = evenly_spaced(n, keep)
    assert layers[-1] == n - 1 and len(layers) == keep and layers == sorted(set(layers))


def test_drop_layers_equals_running_the_kept_layers(tiny):
    small = drop_layers(tiny, [3])
    assert small.encoder.config.num_hidden_layers == 1 and tiny.encoder.config.num_hidden_layers == 4
    assert model_size(small).parameters < model_size(tiny).parameters
    with pytest.raises(ValueError, match="subset"):
        drop_layers(tiny, [7])


def test_prune_ffn_keeps_the_most_important_neurons_and_matches_zeroing(tiny):
    small = prune_ffn(tiny, 0.5)
    assert small.encoder.config.intermediate_size == 48
    zeroed = copy.deepcopy(tiny)
    for big, cut in zip(zeroed.encoder.encoder.layer, small.encoder.encoder.layer):
        w_in, w_out = big.intermediate.dense, big.output.dense
        importance = w_in.weight.norm(dim=1) * w_out.weight.norm(dim=0)
        dropped = importance.argsort()[:48]
        w_out.weight.data[:, dropped] = 0  # a removed neuron contributes nothing downstream
    torch.testing.assert_close(small.encode(TEXTS), zeroed.encode(TEXTS), atol=1e-5, rtol=1e-4)


def test_prune_heads_equals_zeroing_their_output(tiny):
    kept = [[0, 2], [1, 3], [0, 1], [2, 3]]
    removed = apply_head_pruning(copy.deepcopy(tiny), kept)
    zeroed = copy.deepcopy(tiny)
    size = 48 // 4
    for layer, heads in zip(zeroed.encoder.encoder.layer, kept):
        for h in set(range(4)) - set(heads):
            layer.attention.output.dense.weight.data[:, h * size:(h + 1) * size] = 0
    torch.testing.assert_close(removed.encode(TEXTS), zeroed.encode(TEXTS), atol=1e-5, rtol=1e-4)
    assert head_importance(prune_heads(tiny, 2)).shape == (4, 2)
    with pytest.raises(ValueError, match="keep"):
        prune_heads(tiny, 0)


def test_int8_is_close_and_smaller(tiny):
    for mode in ("rowwise", "dynamic"):
        q = quantize_int8(tiny, mode=mode)
        cos = (q.encode(TEXTS) * tiny.encode(TEXTS)).sum(1)
        assert cos.min() > 0.9
        assert model_size(q).disk_bytes < model_size(tiny).disk_bytes
    assert quantize_int8(tiny).quantized == "int8-rowwise"  # the default is the batch-independent scheme
    with pytest.raises(ValueError, match="mode"):
        quantize_int8(tiny, mode="static")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), inputs=st.integers(1, 70), outputs=st.integers(1, 50), bias=st.booleans(),
       log_scale=st.floats(-4, 3), seed=st.integers(0, 2**16))
def test_rowwise_linear_is_the_dequantized_float_product(rows, inputs, outputs, bias, log_scale, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(inputs, outputs, bias=bias)
    layer = RowwiseInt8Linear.from_linear(linear)
    x = torch.randn(rows, inputs) * 10 ** log_scale * torch.rand(rows, 1)  # rows of very different sizes
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert ((codes.float() * scale - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-30).all()  # half a step per row at most
    weights = layer.weight.float() * layer.weight_scale  # dequantized [in, out]
    reference = (codes.float() * scale) @ weights + (layer.bias if bias else 0)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, reference, atol=1e-5 * reference.abs().max().item() + 1e-30, rtol=1e-4)
        exact = linear(x)
        # each input is off by at most half its row's step s_x, each weight by half its channel's step s_w, so
        # |out - exact| <= sum_i |x_i| s_w / 2 + s_x / 2 sum_i |w_i| + inputs * s_x s_w / 4 (no relative bound holds:
        # outputs that cancel to nearly zero carry the absolute error of their terms)
        w, sw = linear.weight.T, layer.weight_scale
        bound = x.abs().sum(1, keepdim=True) * sw / 2 + scale / 2 * w.abs().sum(0) + inputs * scale * sw / 4
        assert ((out - exact).abs() <= bound * (1 + 1e-3) + 1e-5 * reference.abs().max() + 1e-30).all()
        assert torch.equal(layer(x[-1:]), out[-1:])  # a row alone gives the same bits as inside the batch


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), depth=st.integers(1, 2300), cols=st.integers(1, 9), extreme=st.booleans(), seed=st.integers(0, 2**16))
def test_both_int8_kernels_give_the_exact_integer_product(rows, depth, cols, extreme, seed):
    g = torch.Generator().manual_seed(seed)
    if extreme:  # every product 127 * 127 or its negative: sums past fp32's 2**24 once depth > 1040
        a = torch.full((rows, depth), 127, dtype=torch.int8)
        w = (torch.randint(0, 2, (depth, cols), generator=g) * 254 - 127).to(torch.int8)
    else:
        a = torch.randint(-127, 128, (rows, depth), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (depth, cols), generator=g, dtype=torch.int8)
    exact = (a.long() @ w.long())  # int64 reference
    for kernel in ("float", "int_mm"):
        out = int8_matmul(a, w, kernel=kernel)
        assert out.dtype == torch.int32 and torch.equal(out.long(), exact)
    assert int8_kernel("cuda") == "int_mm" and int8_kernel() in ("float", "int_mm")


def test_rowwise_linear_rows_never_see_each_other():
    torch.manual_seed(0)
    layer = RowwiseInt8Linear.from_linear(nn.Linear(16, 8))
    layer.block_rows = 3  # several blocks: block boundaries must not matter either
    x = torch.randn(10, 16)
    noisy = torch.cat([x[:4], torch.randn(5, 16) * 1e4, x[4:]])  # huge batch-mates in the middle
    with torch.no_grad():
        assert torch.equal(layer(noisy)[[0, 1, 2, 3, 9, 10, 11, 12, 13, 14]], layer(x))
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 8)


def test_int8_query_is_the_same_alone_in_a_batch_and_padded(tiny):
    q = quantize_int8(tiny, embeddings=True)
    words = "black maxi dress with long sleeves for a summer wedding in june light linen".split()
    queries = [" ".join(words[i % 5:i % 5 + 1 + i % 11]) for i in range(64)]  # 64 queries of 1 to 11 words
    batched = q.encode(queries, max_length=32)
    alone = torch.cat([q.encode([t], max_length=32) for t in queries[:8]])
    assert torch.equal(alone, batched[:8])  # the same bits: fp32 noise of 1e-7 would already flip int8 roundings
    padded = q.tokenizer(queries[:8], padding="max_length", max_length=48, return_tensors="pt")
    torch.testing.assert_close(q.embed(dict(padded)), batched[:8], atol=1e-6, rtol=0)


def test_int8_embeddings_are_per_row_affine_codes(tiny):
    q = quantize_int8(tiny, embeddings=True)
    original = tiny.encoder.embeddings.word_embeddings.weight.detach()
    table = q.encoder.embeddings.word_embeddings
    assert isinstance(table, Int8Embedding) and table.weight.dtype == torch.uint8
    restored = table(torch.arange(len(original)))
    step = (original.max(1).values - original.min(1).values) / 255  # one 8-bit step per row
    assert ((restored - original).abs() <= step[:, None] / 2 + 1e-6).all()
    assert (q.encode(TEXTS) * tiny.encode(TEXTS)).sum(1).min() > 0.9
    # the tiny model is almost all embedding table (rows of 48: 48 one-byte codes + fp32 scale and offset
    # against 192 bytes), so quantizing the table is what brings the file under a third
    assert model_size(quantize_int8(tiny)).disk_bytes > model_size(tiny).disk_bytes / 3
    assert model_size(q).disk_bytes < model_size(tiny).disk_bytes / 3


def test_int8_scorer_round_trips(tmp_path, tiny):
    from recbook.model import CrossEncoderScorer
    scorer = quantize_int8(CrossEncoderScorer(tiny.encoder, tiny.tokenizer), embeddings=True)
    back = load_compressed(save_compressed(scorer, tmp_path / "scorer"))
    assert isinstance(back, CrossEncoderScorer)
    torch.testing.assert_close(back.score(TEXTS, TEXTS), scorer.score(TEXTS, TEXTS), atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", ["heads", "int8", "int8+layers", "int8+embeddings", "int8 dynamic", "ffn", "plain"])
def test_compressed_models_round_trip(tmp_path, tiny, make):
    variant = {"heads": lambda m: prune_heads(m, 2), "int8": quantize_int8,
               "int8+embeddings": lambda m: quantize_int8(m, embeddings=True),
               "int8+layers": lambda m: quantize_int8(prune_heads(drop_layers(m, [1, 3]), 3)),
               "int8 dynamic": lambda m: quantize_int8(m, embeddings=True, mode="dynamic"),
               "ffn": lambda m: prune_ffn(m, 0.25), "plain": lambda m: m}[make](tiny)
    back = load_compressed(save_compressed(variant, tmp_path / make), device="cpu")
    exact = make.startswith("int8")  # same int8 codes and scales: the same arithmetic
    torch.testing.assert_close(back.encode(TEXTS), variant.encode(TEXTS), atol=1e-6 if exact else 1e-5, rtol=0 if exact else 1e-4)
    assert getattr(back, "quantized", None) == getattr(variant, "quantized", None)
    if make in ("int8", "int8+embeddings", "int8+layers"):
        assert (tmp_path / make / "int8_state.safetensors").is_file() and not list((tmp_path / make).glob("*.pt"))


@pytest.mark.parametrize("make", ["float", "int8"])
def test_save_compressed_never_replaces_a_readers_folder(tmp_path, tiny, make):
    model = quantize_int8(tiny) if make == "int8" else tiny
    mine = tmp_path / "exports"
    mine.mkdir()
    (mine / "report.pdf").write_bytes(b"%PDF")
    with pytest.raises(FileExistsError, match="not a recbook model folder"):
        save_compressed(model, mine)
    assert [p.name for p in mine.iterdir()] == ["report.pdf"]
    save_compressed(model, tmp_path / "model")
    again = load_compressed(save_compressed(model, tmp_path / "model"), device="cpu")  # its own folder: replaced
    assert getattr(again, "quantized", None) == getattr(model, "quantized", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "model"]


def test_load_compressed_names_an_unknown_quantization(tmp_path, tiny):
    path = save_compressed(quantize_int8(tiny), tmp_path / "int8")
    meta = json.loads((path / "recbook.json").read_text())
    (path / "recbook.json").write_text(json.dumps({**meta, "quantized": "int4-something"}))
    with pytest.raises(ValueError, match="int4-something.*Compress the model again"):
        load_compressed(path)


def test_load_compressed_rejects_non_models(tmp_path):
    with pytest.raises(ValueError, match="no recbook.json"):
        load_compressed(tmp_path)


def test_onnx_export_matches_torch(tmp_path, tiny):
    exact = OnnxBiEncoder(export_onnx(tiny, tmp_path / "fp32", quantize=False))
    torch.testing.assert_close(exact.encode(TEXTS), tiny.encode(TEXTS), atol=1e-4, rtol=1e-3)
    int8 = OnnxBiEncoder(export_onnx(tiny, tmp_path / "int8", quantize=True))
    assert (int8.encode(TEXTS) * tiny.encode(TEXTS)).sum(1).min() > 0.9
    # the exported model object is left intact (transformers-5 exporter gotcha)
    before = tiny.encode(TEXTS)
    export_onnx(tiny, tmp_path / "again", quantize=False)
    torch.testing.assert_close(tiny.encode(TEXTS), before)


def test_distillation_moves_the_student_towards_the_teacher(tiny, tokenizer):
    teacher = tiny  # and an unrelated student: one layer, its own random weights
    student = BiEncoder(tiny_bert(tokenizer, hidden=48, layers=1, heads=4, ffn=96, seed=1), tokenizer, doc_max_length=64)
    queries = ["red dress", "blue jeans", "wool sweater", "swim suit"] * 4
    docs = ["dress red summer", "jeans denim blue", "sweater wool warm", "swimsuit beach"] * 4
    items = [0, 1, 2, 3] * 4

    def gap(model):
        with torch.no_grad():
            t = teacher.encode(queries[:4], max_length=32) @ teacher.encode(docs[:4]).T
            s = model.encode(queries[:4], max_length=32) @ model.encode(docs[:4]).T
        return (torch.softmax(t / 0.05, 1) - torch.softmax(s / 0.05, 1)).abs().sum().item()

    before = gap(student)
    distill_bi_encoder(student, teacher, queries, docs, items, epochs=5, batch_size=4, lr=1e-3, alpha=1.0, progress=False)
    assert gap(student) < before


def test_bench_writes_the_fields_chapter_04_reports(tmp_path, monkeypatch):
    """compression.json: a variants list with the agreed fields, the teacher's row and the chosen point."""
    import recbook.compress as compress
    from recbook.core import BenchResult, LatencyStats, ModelSize
    cpu = torch.device("cpu")

    def row(name, ms, ndcg, speedup, params):
        return BenchResult(name, {"ndcg@10": ndcg, "retained": ndcg / 0.5}, LatencyStats.from_samples([ms / 1e3] * 3, 64, cpu),
                           ModelSize(params, params * 4, params * 4), {"speedup": speedup, "query_latency_ms_p50": 1.0})

    rows = [row("teacher (fp32)", 800, 0.5, 1.0, 1000), row("fast", 90, 0.49, 8.9, 300), row("faster", 50, 0.3, 16, 100)]
    monkeypatch.setattr(compress, "compression_study", lambda quick, encoder=None: (rows, {"quick": quick}))
    path = compress.bench(tmp_path, quick=True)
    payload = json.loads(path.read_text())
    fields = {"name", "params", "size_mb", "latency_ms_p50", "latency_ms_p95", "throughput", "ndcg@10", "retained", "speedup"}
    assert all(fields <= set(v) for v in payload["variants"])
    assert payload["teacher"]["name"] == "teacher (fp32)" and payload["machine"]["torch"]
    assert payload["budget_ms"] == pytest.approx(100.0, rel=1e-6)
    assert payload["chosen"] == "fast"  # within 800/8 ms, and better than "faster"
