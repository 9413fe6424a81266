"""A1111 prompt syntax: parse_attention against A1111's own doctests and rules, LoRA tags, is_plain."""

from __future__ import annotations

import pytest

from sdserve_core.prompt_syntax import BREAK, PromptSyntaxError, extract_loras, is_plain, parse_attention

# modules/prompt_parser.py::parse_prompt_attention's doctests, verbatim (lists there, tuples here).
A1111_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCTESTS)
def test_a1111_doctests(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("[low]", [("low", 1 / 1.1)]),
        ("[[low]]", [("low", 1 / 1.1 / 1.1)]),
        ("(a:1.3)", [("a", 1.3)]),
        ("(a: 1.3 )", [("a", 1.3)]),
        ("(a:-0.5)", [("a", -0.5)]),
        ("(a:.5)", [("a", 0.5)]),
        ("[a:1.3]", [("a:1.3", 1 / 1.1)]),  # a weight only closes a round bracket
        ("a:1.3)", [("a:1.3)", 1.0)]),  # no open bracket: literal text
        ("a) b]", [("a) b]", 1.0)]),  # unmatched closers are literal
        ("x \\\\ y", [("x \\ y", 1.0)]),
        ("x \\ y", [("x  y", 1.0)]),  # a lone backslash is dropped, as in A1111
        ("\\(a\\)", [("(a)", 1.0)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("((a) b", [("a", 1.1 * 1.1), (" b", 1.1)]),
        ("a: b", [("a: b", 1.0)]),
        ("(a)(b:1.1)", [("ab", 1.1)]),  # equal weights merge across brackets
    ],
)
def test_a1111_rules(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a, BREAK\nb", [("a,", 1.0), BREAK, ("b", 1.0)]),
        ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
        ("a BREAKFAST", [("a BREAKFAST", 1.0)]),  # a whole word only
        ("a break b", [("a break b", 1.0)]),  # upper case only
        ("(a) BREAK b", [("a", 1.1), ("", 1.0), BREAK, ("b", 1.0)]),
        # Inside brackets the marker's weight is multiplied too, so A1111 no longer sees a BREAK there.
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ],
)
def test_break(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


def test_a_weight_python_cannot_read_is_a_syntax_error() -> None:
    with pytest.raises(PromptSyntaxError, match=r"\(a:1\.2\.3\)|:1\.2\.3\)"):
        parse_attention("(a:1.2.3)")
    assert issubclass(PromptSyntaxError, ValueError)


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("a red circle", True),
        ("", True),
        ("a: b, c.", True),
        ("a) b", True),
        ("(a) b", False),
        ("[a]", False),
        ("\\(a\\)", False),
        ("a BREAK b", False),
        ("BREAK", False),
        ("(a:1)", False),  # weight 1, but syntax all the same
    ],
)
def test_is_plain(text: str, plain: bool) -> None:
    assert is_plain(text) is plain


def test_lora_tags_are_removed_in_order() -> None:
    text, loras = extract_loras("a <lora:detail:0.6> cat, <lora:My Style v2> <lora:x:-1.5e-1>")
    assert text == "a  cat,  "
    assert loras == [("detail", 0.6), ("My Style v2", None), ("x", -0.15)]


def test_lora_free_text_is_untouched() -> None:
    assert extract_loras("a (cat:1.2) <b> <lora:x") == ("a (cat:1.2) <b> <lora:x", [])


@pytest.mark.parametrize(
    ("tag", "words"),
    [
        ("<lora:>", "name is empty"),
        ("<lora: :1>", "name is empty"),
        ("<lora:x:>", "not a number"),
        ("<lora:x:high>", "not a number"),
        ("<lora:x:nan>", "not a number"),
        ("<lora:x:1_0>", "not a number"),
        ("<lora:x:1:2>", "<lora:NAME:SCALE>"),
    ],
)
def test_malformed_lora_tags(tag: str, words: str) -> None:
    with pytest.raises(PromptSyntaxError) as info:
        extract_loras(f"a {tag} b")
    assert tag in str(info.value) and words in str(info.value)
