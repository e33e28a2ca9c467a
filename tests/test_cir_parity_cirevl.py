"""CIReVL's retrieval step pinned to numbers of CIReVL's own code (Vision_by_Language ``src/utils.py``
``text_encoding``, ``src/compute_results.py`` ``fiq``), run on the same tiny CLIP, captions and rewrites:
its text features (first rows), target ranks and Recall@K on FashionIQ-layout dress data, its prompts
(SHA-256 of ``prompts.blip_prompt`` and ``prompts.structural_modifier_prompt_fashion``) and how it reads the
rewriter's answer."""
import hashlib

import open_clip
import pytest
import torch
import torch.nn.functional as F

import e2_core
from e2_cir.methods import TrainData
from e2_cir.methods.cirevl import (CAPTION_PROMPT, CIREVL_FASHION_PROMPT_SHA256, INSTRUCTIONS, REWRITE_PROMPT,
                                   CIReVL, HFRewriter, edited_description)
from e2_core.data.fashioniq import load_fashioniq
from e2_data.synthetic import write_fashioniq
from e2_eval.fashioniq import compose, composed_recall, embed_names

# CIReVL's code on the setup below (its OpenAI-CLIP and its open_clip text paths gave the same numbers)
THEIR_RANKS = [15, 24, 63, 15, 34, 61, 19, 60, 40, 69, 5, 77, 42, 4, 19, 73, 22, 18, 45, 1]
THEIR_RECALL = {1: 0.0, 5: 10.0, 10: 15.0, 50: 70.0}
THEIR_FEATURES = [[-0.106043, 0.147188, -0.008485, -0.036462], [0.125625, 0.190872, 0.077979, -0.159835]]
THEIR_PROMPT_SHA256 = {"caption": "1c473f584541bcf5838910c7358e52266e481bccc975d0054cb4cf2e0655dce7",
                       "rewrite": "73453274fcfbb108b2181defab2f8265d29c20fda15977fc0d19c08d3ecabb56"}

GARNISH = ["a red", "a navy blue", "a floral print", "a black and white striped", "a sleeveless", "a long sleeve"]


def tiny_clip():
    """Width 64, 2 layers per tower, context 77, QuickGELU; weights rounded to fp16 (as OpenAI's CLIP ships)."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=64, quick_gelu=True,
        vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
            p.copy_(p.half().float())
    return model.eval()


def fixed_caption(image):
    """A caption fixed by the image's pixels; every fifth one long enough to pass 77 tokens once rewritten."""
    digest = int(hashlib.md5(image.convert("RGB").tobytes()).hexdigest(), 16)
    text = f"{GARNISH[digest % len(GARNISH)]} garment with a logo on the {['chest', 'back', 'sleeve'][digest % 3]}"
    return text + (" " + " ".join(["and many more details"] * 14) if digest % 5 == 0 else "")


def fixed_answer(prompt: str) -> str:
    """A language model's answer fixed by the caption and instruction: the shapes a chat model gives, and some it
    should not."""
    lines = prompt.split("\n")
    caption, instruction = lines[-2][len("Image Content: "):], lines[-1][len("Instruction: "):]
    return [
        f"Edited Description: {caption}, but {instruction}",
        f"Instruction: {instruction}\nEdited Description: {caption} that {instruction}.",
        f"  Edited Description: the garment now {instruction}: with a note after a colon",
        "I am not able to edit this description.",
        "Edited Description:",
        f"Edited Description: {caption} " + " ".join(["and it is very long indeed"] * 20),
        f"Edited Description: a $20 {caption} that {instruction}",
    ][int(hashlib.md5("\n".join(lines[-2:]).encode()).hexdigest(), 16) % 7]


def test_retrieval_matches_the_numbers_of_cirevls_code(tmp_path):
    from e2_cir import _queries

    write_fashioniq(tmp_path, triplets_per_category=20, distractors=2, seed=0)
    data = load_fashioniq(tmp_path, "dress", "val")
    encoder = e2_core.load_encoder(tiny_clip())
    gallery = embed_names(encoder, data.gallery, data, normalize=False)
    method = CIReVL()
    method.prepare(encoder, TrainData(torch.zeros(0, 64), [c for t in data.triplets for c in t.captions]))
    prompts = []
    method.caption_model = lambda batch: [fixed_caption(batch.load_image(n)) for n in batch.reference_names]
    method.rewrite_model = lambda prompt: prompts.append(prompt) or fixed_answer(prompt)
    queries, targets = _queries(method, encoder, data, gallery, "cirevl", batch_size=1000)
    result = composed_recall(queries, F.normalize(gallery, dim=-1), data.gallery, targets)

    assert len(data.gallery) == 79 and result["queries"] == 20
    assert torch.allclose(queries[:2, :4], torch.tensor(THEIR_FEATURES), atol=1e-5)
    assert result["ranks"] == THEIR_RANKS
    assert {k: result[f"R@{k}"] for k in (1, 5, 10, 50)} == THEIR_RECALL
    # the rewriter was sent the instructions, then the caption and the instruction as CIReVL's code writes them
    first = data.triplets[0]
    assert prompts[0] == (INSTRUCTIONS + "\nImage Content: " + fixed_caption(data.load_image(first.reference))
                          + "\nInstruction: " + compose("cirevl", first.captions)[0])
    assert sum(len(encoder.tokenizer.encode(t)) + 2 > 77 for t in method.last_texts) == 5  # cut at 77 tokens


def test_prompts_are_cirevls_and_its_rewriter_instructions_are_one_option_away(tmp_path):
    assert hashlib.sha256(CAPTION_PROMPT.encode()).hexdigest() == THEIR_PROMPT_SHA256["caption"]
    assert CIREVL_FASHION_PROMPT_SHA256 == THEIR_PROMPT_SHA256["rewrite"]
    assert CIReVL().notes["rewriter_prompt"] == "built in"
    given = tmp_path / "instructions.txt"
    given.write_text("Edit the garment.\n", encoding="utf-8")
    method = CIReVL(prompt=str(given))
    sent = []
    method.rewrite_model = lambda prompt: sent.append(prompt) or "Edited Description: a blue dress"
    assert method.rewrite("a red dress", "is blue and shorter") == "a blue dress"
    assert sent == ["Edit the garment.\n\nImage Content: a red dress\nInstruction: is blue and shorter"]
    assert method.notes["rewriter_prompt"] == str(given)
    with pytest.raises(FileNotFoundError, match="cirevl prompt=.*nowhere.txt: no such file"):
        CIReVL(prompt=str(tmp_path / "nowhere.txt"))


@pytest.mark.parametrize("answer, description", [
    ("Edited Description: a blue dress", "a blue dress"),
    ("Instruction: is blue\nEdited Description: a blue dress.", "a blue dress."),  # the first such line
    ("  Edited Description: a dress: blue and short", "a dress"),  # up to the next colon
    ("Edited Description:", "is blue"),  # empty: the instruction
    ("A blue dress.", "is blue"),  # no such line: the instruction
    ("Description: a blue dress", "is blue"),
])
def test_the_answer_is_read_as_cirevls_code_reads_it(answer, description):
    assert edited_description(answer, "is blue") == description


def test_a_local_rewriter_stops_at_a_blank_line():
    class Characters:  # one character per token id
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(int(i)) for i in ids)

    rewriter = HFRewriter.__new__(HFRewriter)
    rewriter.tokenizer, rewriter.stop = Characters(), "\n\n"
    ids = torch.tensor([[ord(c) for c in "PROMPT" + "Edited Description: a\n\nInstruction: more"]])
    stop = rewriter._stop_after(6)
    assert stop(ids[:, :28], None).tolist() == [False] and stop(ids[:, :29], None).tolist() == [True]
    assert rewriter._answer(ids[0], 6) == "Edited Description: a"
