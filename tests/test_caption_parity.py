"""DeCap and CapDec as their authors' code computes them. The pinned numbers were recorded by running the
originals' code (DeCap's train.py loss and inference notebook: memory projection and greedy Decoding; CapDec's
train.py: noise_injection, ClipCap's TransformerMapper, the training loss with its padding) on the same seeded
tiny weights; ours matched them to 1e-6. The paper presets build the originals' shapes."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e2_caption.capdec import CapDec, ClipCap, inject_noise
from e2_caption.captioner import Training, _schedule, caption_length_limit
from e2_caption.decap import DeCap
from e2_caption.decoder import DecoderConfig, MapperBlock, PrefixLM, TransformerMapper

CAPTIONS = ["a red wool coat by acme", "blue denim jeans with a logo", "a white silk shirt",
            "a black leather jacket with zips", "a green cotton dress", "a grey knit hat"]


def seeded_(module, seed, scale):
    """Every parameter N(0, scale^2), drawn in the order of its name."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def encoder():
    import open_clip

    return SimpleNamespace(embed_dim=32, tokenizer=open_clip.get_tokenizer("ViT-B-32"), device=torch.device("cpu"),
                           name="stub", fingerprint=lambda: "0" * 64)


def test_decap_memory_projection_loss_and_greedy_decoding_are_the_originals(encoder):
    config = DecoderConfig(layers=2, heads=4, width=64, positions=1024, prefix_length=1, mapper="linear",
                           max_tokens=18, start_token=True, full_vocab=True)
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(len(CAPTIONS), 32, generator=g) * 2, torch.randn(2, 32, generator=g) * 2
    captioner = DeCap(encoder, config)
    captioner.build(CAPTIONS, text)
    seeded_(captioner.decoder, 0, 0.5)
    captioner.decoder.eval()
    tokens, mask = captioner.vocab.encode(CAPTIONS, config.max_tokens)
    with torch.no_grad():  # start token, the caption, the end token; label smoothing 0.1 over CLIP's 49,408 ids
        loss = captioner.decoder.loss(captioner.training_inputs(text), tokens, mask, 0.1).item()
    assert loss == pytest.approx(14.730903625488281, abs=1e-4)
    prefix = captioner.image_inputs(F.normalize(image, dim=-1))  # softmax(sim * 100) @ memory, re-normalised
    assert prefix[0, :4].tolist() == pytest.approx([-0.097199, 0.156941, 0.189475, 0.220134], abs=1e-5)
    written = [[captioner.vocab.ids[i] for i in row] for row in captioner.decoder.generate(prefix, 1, 30)]
    assert written == [
        [3390, 3390, 11891, 41630, 41630, 12992, 37921, 11891, 11891, 40970, 11891, 40970, 11891, 11891, 40970, 11891,
         40970, 12992, 12992, 37921, 12992, 11891, 40970, 11891, 40970, 40970, 40970, 12992, 40970, 12992],
        [11891, 40970, 12992, 12992, 3390, 40970] + [12992] * 14 + [40970] + [12992] * 9]


def test_capdec_noise_mapper_and_loss_are_the_originals():
    config = DecoderConfig(layers=2, heads=4, width=64, positions=128, prefix_length=4, clip_length=3,
                           mapper="transformer", mapper_layers=2, mapper_heads=8, vocab_size=50, eos_id=1)
    decoder = PrefixLM(32, config)
    seeded_(decoder, 1, 0.2)
    decoder.eval()
    g = torch.Generator().manual_seed(2)
    raw, noise = torch.randn(3, 32, generator=g) * 3, torch.randn(3, 32, generator=g)
    rows = [torch.randint(2, 50, (n,), generator=g) for n in (7, 5, 3)]
    noisy = inject_noise(raw, 0.016, noise=noise)
    assert noisy[0, :4].tolist() == pytest.approx([-0.172004, 0.119516, -0.201734, -0.117562], abs=1e-5)
    with torch.no_grad():
        prefix = decoder.prefix(noisy)
        assert prefix.shape == (3, 4, 64)
        assert prefix[0, 0, :4].tolist() == pytest.approx([0.034614, 0.080513, -0.172403, -0.294466], abs=1e-5)
        assert prefix.abs().sum().item() == pytest.approx(725.4736, abs=1e-2)
        tokens = torch.zeros(3, 7, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        loss = decoder.loss(noisy, tokens, tokens > 0, 0.0).item()  # CapDec's: no smoothing, padding ignored
    assert loss == pytest.approx(4.275132179260254, abs=1e-5)


def test_the_mapper_is_clipcaps_blocks():
    """No biases on queries, keys and values; 8 heads at any width; an MLP twice as wide; no dropout."""
    mapper = TransformerMapper(32, 64, length=4, layers=2, clip_length=3)
    block = mapper.transformer["layers"][0]
    assert isinstance(block, MapperBlock) and block.self_attn.in_proj_bias is None and block.heads == 8
    assert block.linear1.out_features == 128 and block.dropout == 0.0
    assert mapper.project.out_features == 3 * 64 and mapper.constants.shape == (4, 64)
    assert mapper(torch.randn(2, 32)).shape == (2, 4 * 64)


def test_capdecs_caption_length_rule():
    """max_tokens 0: the mean length plus 10 standard deviations, at most the longest (CapDec's train.py)."""
    lengths = [5] * 200 + [100]
    mask = torch.zeros(len(lengths), 102, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n + 1] = True  # the text, then the end token
    vocab = SimpleNamespace(encode=lambda captions, max_tokens: (None, mask))
    assert caption_length_limit(vocab, [""] * len(lengths)) == 72  # int(5.47 + 10 * 6.70), below 100
    short = SimpleNamespace(encode=lambda captions, max_tokens: (None, mask[:3]))
    assert caption_length_limit(short, ["", "", ""]) == 5


def test_the_start_token_is_trained_first_and_dropped_from_the_output():
    torch.manual_seed(0)  # the decoder's random weights: seeded, so what it writes does not hang on earlier tests
    config = DecoderConfig(layers=1, heads=2, width=32, prefix_length=1, vocab_size=20, eos_id=0, bos_id=19)
    decoder = PrefixLM(16, config).eval()
    embedding, tokens = torch.randn(2, 16), torch.tensor([[5, 6, 0], [7, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    with torch.no_grad():
        plain = decoder.loss(embedding, torch.cat([torch.full((2, 1), 19), tokens], 1),
                             torch.cat([torch.ones(2, 1, dtype=torch.bool), mask], 1))
        config.start_token = True
        assert decoder.loss(embedding, tokens, mask).item() == pytest.approx(plain.item(), abs=1e-6)
    written = decoder.generate(embedding, 1, 8)
    assert len(written[0]) > 0
    config.bos_id = written[0][0]  # the first written id stands in for the start token: dropped everywhere
    assert all(config.bos_id not in row for row in decoder.generate(embedding, 1, 8))


def test_paper_presets_build_the_originals_shapes(encoder, tiny_hf_models):
    decap = DeCap(encoder, preset="paper")
    c, t = decap.config, decap.training
    assert (c.layers, c.heads, c.width, c.positions, c.prefix_length, c.mapper) == (4, 4, 768, 1024, 1, "linear")
    assert c.start_token and c.full_vocab and c.max_tokens == 18 and c.language_model is None
    assert (t.lr, t.warmup, t.schedule, t.epochs, t.batch_size, t.label_smoothing, t.weight_decay, t.eps) == \
        (1e-5, 1000, "linear", 10, 128, 0.1, 0.0, 1e-6)
    assert (decap.beams, decap.max_tokens, decap.options["tau"], decap.options["memory_size"]) == (1, 30, 0.01, 500_000)
    decap.build(CAPTIONS[:2], torch.randn(2, 32))  # every CLIP BPE id
    assert decap.vocab.size == 49408 and decap.vocab.ids[decap.config.bos_id] == 49406
    with torch.device("meta"):
        lm = PrefixLM(32, decap.config)
    gpt = lm.lm.config
    assert (len(lm.lm.transformer.h), gpt.n_head, gpt.n_embd, gpt.n_positions) == (4, 4, 768, 1024)
    assert isinstance(lm.mapper, nn.Linear) and lm.mapper.out_features == 768

    capdec = CapDec(encoder, preset="paper")
    c, t = capdec.config, capdec.training
    assert (c.layers, c.heads, c.width, c.positions, c.prefix_length, c.clip_length) == (12, 12, 768, 1024, 40, 40)
    assert (c.mapper, c.mapper_layers, c.mapper_heads, c.max_tokens, c.start_token) == ("transformer", 8, 8, 0, False)
    assert (t.lr, t.warmup, t.schedule, t.epochs, t.batch_size, t.label_smoothing, t.weight_decay) == \
        (2e-5, 5000, "linear", 10, 34, 0.0, 0.0)
    assert (capdec.beams, capdec.max_tokens, capdec.options["noise_variance"]) == (5, 67, 0.016)
    capdec.config.vocab_size = 1000
    with torch.device("meta"):
        lm = PrefixLM(512, capdec.config)
    assert (len(lm.lm.transformer.h), lm.lm.config.n_head, lm.lm.config.n_embd) == (12, 12, 768)
    blocks = lm.mapper.transformer["layers"]
    assert len(blocks) == 8 and blocks[0].heads == 8 and lm.mapper.clip_length == 40 and lm.mapper.length == 40
    local = str(tiny_hf_models / "rewriter")  # a local GPT-2 folder replaces the one from scratch
    assert CapDec(encoder, preset="paper", language_model=local).config.language_model == local
    assert ClipCap(encoder, preset="paper").options["noise_variance"] == 0.0
    with pytest.raises(ValueError, match="preset 'huge'"):
        DeCap(encoder, preset="huge")


def test_demo_presets_keep_their_small_sizes(encoder):
    decap, capdec = DeCap(encoder), CapDec(encoder)
    assert (decap.config.layers, decap.config.width, decap.config.prefix_length) == (2, 256, 1)
    assert decap.config.mapper == "linear"
    assert (capdec.config.prefix_length, capdec.config.mapper, capdec.config.mapper_layers) == (10, "transformer", 2)
    assert decap.training == Training() and (decap.beams, decap.max_tokens, decap.options["memory_size"]) == (1, 64, 0)
    assert decap.config.max_tokens == capdec.config.max_tokens == 0      # captions kept by the length rule, not cut at 20
    assert (Training().lr, Training().schedule, Training().label_smoothing) == (2e-4, "constant", 0.1)


def test_the_paper_schedule_warms_up_then_decays_to_zero():
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    schedule = _schedule(optimizer, Training(lr=1.0, warmup=4, schedule="linear"), 12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_a_decoder_saved_with_the_earlier_mapper_loads_and_maps_the_same():
    """Decoders saved before the mapper followed CapDec's were nn.TransformerEncoder blocks (biased queries,
    keys and values; width // 64 heads; dropout 0.1): their configs lack those fields, and fill them so."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, nhead=1, dim_feedforward=128, batch_first=True, norm_first=True)
    earlier = nn.ModuleDict(dict(project=nn.Linear(32, 3 * 64),
                                 transformer=nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)))
    with torch.no_grad():
        for block in earlier["transformer"].layers:
            block.self_attn.in_proj_bias.normal_()
    state = {**earlier.state_dict(), "constants": torch.randn(3, 64) * 0.02}
    config = DecoderConfig.from_dict(dict(layers=2, heads=4, width=64, prefix_length=3, mapper="transformer",
                                          mapper_layers=2, max_tokens=20, vocab_size=40, eos_id=0, language_model=None))
    assert (config.mapper_heads, config.mapper_qkv_bias, config.mapper_dropout) == (1, True, 0.1)
    mapper = TransformerMapper(32, 64, 3, 2, heads=config.mapper_heads, qkv_bias=config.mapper_qkv_bias,
                               dropout=config.mapper_dropout)
    mapper.load_state_dict(state)
    earlier.eval(), mapper.eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        tokens = torch.cat([earlier["project"](x).view(2, 3, 64), state["constants"].expand(2, -1, -1)], dim=1)
        expected = earlier["transformer"](tokens)[:, 3:].reshape(2, -1)
        assert (mapper(x) - expected).abs().max().item() < 1e-5
