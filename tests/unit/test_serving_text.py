"""The serving worker's incremental text: only new text is sent, nothing after a stop string, and a
character split over tokens or a possible stop prefix is held back until it is known."""

from __future__ import annotations

from posttrain.serving.text import TextStream

PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xc3", 6: b"\xa9!", 7: b"\n", 8: b"END", 9: b"E"}


def decode(ids):
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def run(ids, stop=()):
    stream = TextStream(decode, stop)
    sent = []
    for i in ids:
        piece, stopped = stream.push(i)
        sent.append(piece)
        if stopped:
            return sent, True
    sent.append(stream.flush())
    return sent, False


def test_each_token_sends_only_its_new_text():
    assert run([1, 2, 3, 4]) == (["Hel", "lo", " wor", "ld", ""], False)


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    assert run([1, 5, 6]) == (["Hel", "", "é!", ""], False)


def test_nothing_after_a_stop_string_is_sent():
    sent, stopped = run([1, 2, 7, 3], stop=["\n"])
    assert stopped and "".join(sent) == "Hello"


def test_a_possible_stop_prefix_is_held_back_then_released():
    # "E" may begin "END": held back; at the end of the row it is sent after all.
    assert run([1, 9], stop=["END"]) == (["Hel", "", "E"], False)
    sent, stopped = run([1, 8, 2], stop=["lEN"])
    assert stopped and "".join(sent) == "He"
