import pytest

from captcha_lit.charset import PRESETS, Charset


@pytest.mark.parametrize(
    ("spec", "size", "text"),
    [
        ("0-9A-Z", 36, "A7ZQ0"),
        ("0-9a-z", 36, "x9z0a"),
        ("0-9", 10, "0918273"),
        ("A-Z", 26, "HELLO"),
        ("0-9A-Za-z", 62, "aZ9zA0"),
        ("xyz#@", 5, "@#zyx"),  # a custom literal string, in its own order
    ],
)
def test_round_trip(spec, size, text):
    cs = Charset(spec)
    assert len(cs) == size
    encoded = cs.encode(text)
    assert all(0 <= i < size for i in encoded)
    assert cs.decode(encoded) == text
    assert cs.blank == size  # the CTC blank comes right after the last character


def test_preset_and_literal_are_the_same_charset():
    assert Charset("0-9A-Z") == Charset(PRESETS["0-9A-Z"])
    assert Charset("0-9A-Z").chars == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert Charset("0-9A-Z") != Charset("0-9a-z")


def test_custom_charset_keeps_given_order():
    cs = Charset("cab")
    assert cs.encode("abc") == [1, 2, 0]
    assert cs.decode([2, 1, 0]) == "bac"


def test_encode_batch_pads_to_max_length():
    cs = Charset("0-9")
    rows = cs.encode_batch(["12", "3456", ""], max_length=4)
    assert rows == [[1, 2, -1, -1], [3, 4, 5, 6], [-1, -1, -1, -1]]
    assert cs.encode_batch(["1"], max_length=3, pad=99) == [[1, 99, 99]]
    # decode skips the (negative) padding
    assert cs.decode(rows[0]) == "12"


def test_encode_batch_rejects_too_long_label():
    with pytest.raises(ValueError, match="longer than the maximum length 3"):
        Charset("0-9").encode_batch(["1234"], max_length=3)


def test_unknown_character_names_label_and_charset():
    with pytest.raises(ValueError) as info:
        Charset("0-9A-Z").encode("AB#c")
    message = str(info.value)
    assert "'AB#c'" in message  # the label
    assert "0-9A-Z" in message  # the charset
    assert "#" in message and "c" in message  # the offending characters


def test_unknown_character_in_custom_charset_names_it():
    with pytest.raises(ValueError, match="'xyz'"):
        Charset("xyz").encode("xq")


def test_duplicate_characters_rejected():
    with pytest.raises(ValueError, match="duplicate characters 'A'"):
        Charset("AAB")


def test_empty_charset_rejected():
    with pytest.raises(ValueError, match="empty"):
        Charset("")


def test_whitespace_and_non_string_rejected():
    with pytest.raises(ValueError, match="whitespace"):
        Charset("AB C")
    with pytest.raises(TypeError, match="must be a string"):
        Charset(["A", "B"])


def test_decode_rejects_out_of_range_index():
    with pytest.raises(ValueError, match="outside charset of size 10"):
        Charset("0-9").decode([1, 10])
