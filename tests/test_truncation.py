"""Prompt truncation keeps the group: the first line's start and the prompt's end survive, the
middle goes. Word-level tokenizer (one token per word, a BOS in front), counts worked out by hand."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from grpo.logprobs import encode_pairs, first_line_tokens, truncate_prompt
from grpo.modeling import train_tokenizer

BODY = " ".join(f"w{i}" for i in range(40))
TAIL = "Please select the best response:\nA. Yes\nB. No\nAnswer:"  # 10 words
LONG_FIRST_LINE = f"Opinion of people in Atlantis on: {BODY}\n{TAIL}"  # 46 + 10 words
MANY_LINES = "Opinion of people in Atlantis on: Q?\n" + "\n".join(
    f"line{i} more" for i in range(20)
)  # 7 words, then 40 words on 20 lines
ONE_LINE = " ".join(f"w{i}" for i in range(20))


@pytest.fixture(scope="module")
def words():
    """One token per whitespace-separated word; "[BOS]" before every prompt."""
    texts = [LONG_FIRST_LINE, MANY_LINES, ONE_LINE, "A B"]
    vocab = {
        w: i
        for i, w in enumerate(
            ["[BOS]", "[UNK]", "[PAD]", *sorted({w for t in texts for w in t.split()})]
        )
    }
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="[BOS]",
        eos_token="[PAD]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )


def kept_words(tok, prompt: str, limit: int, **kw) -> list[str]:
    enc = encode_pairs(tok, [prompt], ["A"], ["B"], max_prompt_tokens=limit, **kw)
    return tok.convert_ids_to_tokens(enc.prompt[0])


def test_long_first_line_keeps_group_and_whole_end(words):
    # n = 1 + 46 + 10 = 57, first line F = 47 (BOS + 46 words), after it R = 10.
    # limit 30: a = min(47, max(30 - 10, 15)) = 20 → BOS + 19 words, then all 10 of the end
    kept = kept_words(words, LONG_FIRST_LINE, 30)
    assert len(kept) == 30
    assert kept[:7] == ["[BOS]", "Opinion", "of", "people", "in", "Atlantis", "on:"]
    assert kept[7:20] == [f"w{i}" for i in range(13)]  # the question body, cut after w12
    assert kept[20:] == TAIL.split()  # options and answer cue whole
    # a tokenizer without offsets counts the first line's tokens on their own: same result here
    assert kept_words(WithoutOffsets(words), LONG_FIRST_LINE, 30) == kept


class WithoutOffsets:
    """A tokenizer that is not "fast" (no offset mapping), wrapping a fast one."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts, **kwargs):
        assert not kwargs.pop("return_offsets_mapping", False)
        return self.tok(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_small_budget_splits_it_half_and_half(words):
    # limit 16: a = min(47, max(16 - 10, 8)) = 8 → BOS + 7 words; the last 8 of the end
    kept = kept_words(words, LONG_FIRST_LINE, 16)
    assert kept[:8] == ["[BOS]", "Opinion", "of", "people", "in", "Atlantis", "on:", "w0"]
    assert (
        kept[8:]
        == TAIL.split()[-8:]
        == ["the", "best", "response:", "A.", "Yes", "B.", "No", "Answer:"]
    )


def test_short_first_line_is_kept_whole_and_the_lines_after_it_are_cut(words):
    # F = 1 + 7 = 8, R = 40. limit 20: a = min(8, max(20 - 40, 10)) = 8 → the whole first line
    kept = kept_words(words, MANY_LINES, 20)
    assert kept[:8] == ["[BOS]", "Opinion", "of", "people", "in", "Atlantis", "on:", "Q?"]
    assert kept[8:] == [
        "line14",
        "more",
        "line15",
        "more",
        "line16",
        "more",
        "line17",
        "more",
        "line18",
        "more",
        "line19",
        "more",
    ]


def test_one_line_prompt_keeps_both_ends_and_short_prompts_are_untouched(words):
    kept = kept_words(words, ONE_LINE, 7)  # 21 tokens: first ⌈7/2⌉ = 4, last 3
    assert kept == ["[BOS]", "w0", "w1", "w2", "w17", "w18", "w19"]
    assert kept_words(words, LONG_FIRST_LINE, 57) == ["[BOS]", *LONG_FIRST_LINE.split()]


def test_cutting_the_group_out_fails_naming_the_pair(words):
    # limit 4: a = max(4 - 10, 2) = 2 → [BOS] Opinion … No Answer: — "Atlantis" is gone
    with pytest.raises(
        ValueError, match=r"pair 'q1-Atlantis': its prompt has 57 tokens.*'Atlantis'"
    ):
        kept_words(words, LONG_FIRST_LINE, 4, groups=["Atlantis"], pair_ids=["q1-Atlantis"])
    with pytest.raises(ValueError, match=r"pair 0: "):
        kept_words(words, LONG_FIRST_LINE, 4, groups=["Atlantis"])
    # the same cut passes when the group is unknown or not named in the prompt at all
    assert len(kept_words(words, LONG_FIRST_LINE, 4)) == 4
    assert len(kept_words(words, LONG_FIRST_LINE, 4, groups=["Elsewhere"])) == 4
    # at limit 8 (a = 4: BOS Opinion of people) it is still gone; at 12 (a = 6) it is there
    with pytest.raises(ValueError):
        kept_words(words, LONG_FIRST_LINE, 8, groups=["Atlantis"])
    assert kept_words(words, LONG_FIRST_LINE, 12, groups=["Atlantis"])[5] == "Atlantis"


def test_byte_level_bpe_offsets_find_the_first_line():
    prompt = LONG_FIRST_LINE
    tok = train_tokenizer([prompt] * 3, vocab_size=300)
    enc = tok(prompt, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    first = first_line_tokens(prompt, offsets, len(ids))
    # the first line's tokens decode to the first line (the newline may ride with it)
    assert tok.decode(ids[:first]).rstrip("\n") == prompt.split("\n")[0]
    assert tok.decode(ids[first:]).lstrip("\n") == TAIL
    rest = len(ids) - first
    limit = 2 * rest + 2  # ⌈limit/2⌉ = rest + 1 < limit - rest: the end fits whole
    head = limit - rest
    assert head < first  # the first line is cut
    kept = encode_pairs(tok, [prompt], ["A"], ["B"], max_prompt_tokens=limit).prompt[0]
    assert kept == ids[:head] + ids[first:]
    text = tok.decode(kept)
    assert text.startswith("Opinion of people in Atlantis on: w0") and text.endswith(TAIL)


def test_truncate_prompt_by_hand():
    ids = list(range(10))
    assert truncate_prompt(ids, first_line=3, limit=10) == ids  # fits
    assert truncate_prompt(ids, first_line=3, limit=6) == [
        0,
        1,
        2,
        7,
        8,
        9,
    ]  # a = min(3, max(-1, 3))
    assert truncate_prompt(ids, first_line=8, limit=6) == [0, 1, 2, 3, 8, 9]  # a = max(4, 3)
    assert truncate_prompt(ids, first_line=10, limit=5) == [0, 1, 2, 8, 9]  # one line: 3 + 2
