"""Prompt schedules: both text forms, blending, errors with line and column, encode-once caching."""

import pytest
import torch

from streamdit_core.prompts import PromptSchedule, ScheduleError, frame_weights, parse_schedule, per_frame_context


def test_fizz_and_line_forms_agree():
    fizz = parse_schedule('"0": "a red ball",\n"48": "a blue cube"')
    lines = parse_schedule("0: a red ball\n# comment\n48: a blue cube\n")
    assert fizz.keyframes == lines.keyframes == ((0, "a red ball"), (48, "a blue cube"))
    assert parse_schedule('{"0": "a, b", "10": "c"}').keyframes == ((0, "a, b"), (10, "c"))
    assert parse_schedule("just one prompt").keyframes == ((0, "just one prompt"),)
    assert parse_schedule(lines.to_text()).keyframes == lines.keyframes


def test_weights_hard_switch_and_blend():
    s = parse_schedule("0: a\n10: b")
    assert frame_weights(s, 9) == {"a": 1.0} and frame_weights(s, 10) == {"b": 1.0}
    blended = parse_schedule("0: a\n10: b", transition=3)
    assert frame_weights(blended, 10) == pytest.approx({"a": 0.75, "b": 0.25})
    assert frame_weights(blended, 12) == pytest.approx({"a": 0.25, "b": 0.75})
    assert frame_weights(blended, 13) == {"b": 1.0}
    late = parse_schedule("5: a\n10: b")
    assert frame_weights(late, 0) == {"a": 1.0}


@pytest.mark.parametrize(
    "text,line,column,fragment",
    [
        ("0: a\nx: b", 2, 1, "whole number"),
        ('"0": "a",\n  "1" "b"', 2, 3, 'expected "frame": "prompt"'),
        ('"0": "a" "1": "b"', 1, 10, "expected ','"),
        ("0: a\n0: b", 2, 1, "given twice"),
        ("0: a\n3:   ", 2, 1, "empty"),
        ("   ", 1, 1, "empty"),
    ],
)
def test_errors_name_line_and_column(text, line, column, fragment):
    with pytest.raises(ScheduleError) as err:
        parse_schedule(text)
    assert (err.value.line, err.value.column) == (line, column)
    assert f"line {line}, column {column}" in str(err.value) and fragment in str(err.value)


def test_per_frame_context_blends_cached_embeddings():
    s = parse_schedule("0: a\n2: b", transition=1)
    emb = {"a": torch.zeros(3, 4), "b": torch.ones(3, 4)}
    ctx = per_frame_context(s, [-1, 0, 1, 2, 3], emb)
    assert ctx.shape == (1, 5, 3, 4)
    assert ctx[0, :, 0, 0].tolist() == pytest.approx([0, 0, 0, 0.5, 1])


def test_text_is_encoded_once_per_distinct_prompt():
    from streamdit_core.pipeline import placeholder_pipeline

    pipe = placeholder_pipeline()
    seen = []
    original = pipe.text_encoder.encode

    def counting(texts):
        seen.extend(texts)
        return original(texts)

    pipe.text_encoder.encode = counting
    pipe.encode_prompts(["a red circle", "a blue square", "a red circle"])
    pipe.encode_prompts(["a red circle", "a blue square"])
    assert sorted(seen) == ["a blue square", "a red circle"]


def test_unknown_words_are_unk_not_errors():
    from streamdit_core.pipeline import placeholder_pipeline

    pipe = placeholder_pipeline()
    ids = pipe.text_encoder.tokenizer(["a zebra circle"])
    assert ids[0, 1].item() == 1  # <unk>
    assert pipe.encode_prompts(["a zebra circle"])["a zebra circle"].shape == (24, 128)
    with pytest.raises(ValueError):
        PromptSchedule(keyframes=())
