"""Regenerates tests/data/tokenizer_corpus.jsonl, the tokenizer parity corpus.

    python tests/data/make_tokenizer_corpus.py

The output is deterministic. Tests read only the .jsonl file (one JSON string per line);
this script exists so the corpus can be reviewed and extended. Invisible, control and
separator characters are written as \\uXXXX escapes so that editors and git cannot alter them.
"""

import json
import random
import unicodedata
from pathlib import Path

OUT = Path(__file__).with_name("tokenizer_corpus.jsonl")

SUBJECTS = [
    "a cat", "two dogs", "a man", "a woman", "an old lady", "a group of children", "a red car",
    "a black and white photo", "the Eiffel Tower", "a bowl of ramen", "a skateboarder", "a giraffe",
    "three sheep", "a plate of sushi", "a wooden boat", "a yellow school bus", "a teddy bear",
    "a laptop", "a bicycle", "an elephant", "a pizza", "a fire hydrant", "a clock tower",
    "a surfer", "a baseball player", "a kitchen", "a living room", "a street sign", "a horse",
]
VERBS = [
    "sitting on", "standing next to", "riding", "looking at", "lying on", "walking along",
    "jumping over", "parked in front of", "eating", "holding", "flying above", "floating in",
]
OBJECTS = [
    "a couch", "the beach", "a snowy mountain", "a busy street", "the kitchen table", "a field of flowers",
    "a wooden fence", "the ocean", "a city at night", "a park bench", "a frisbee", "an umbrella",
]
TAILS = ["", ".", " at sunset", " in the rain", ", close up", " on a sunny day", "!", " (photo)", "..."]

ACCENTED = [
    "café au lait", "crème brûlée", "naïve façade", "jalapeño piñata", "mañana en España",
    "über Größe", "Müller straße", "smørbrød på Ørsta", "Ærø og Åland", "São Paulo à noite",
    "Ελληνικά γράμματα", "Привет, мир", "Žluťoučký kůň", "Łódź i Kraków", "Ça va très bien",
    "İstanbul'da bir kedi", "straße STRASSE", "ǅemal", "façade ÉCOLE NOËL", "Ångström",
]
SCRIPTS = [
    "一只猫坐在沙发上", "東京タワーの夜景", "ラーメンを食べる男の人", "서울의 밤거리", "猫と犬が遊んでいる",
    "قطة تجلس على الأريكة", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "แมวนั่งบนโซฟา",
    "中文English混合text", "漢字かなカナ한글", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３", "ﬁne ﬂowers ﬀ",
    "e\u0301cole de\u0301ja\u0300", "ᚠᛇᚻ runes", "ქართული", "Հայերեն", "தமிழ் மொழி", "ꦗꦮ",
]
EMOJI = [
    "😀", "🐱", "🍕🍔🍟", "👍🏻", "👍🏿", "👋🏽 hi", "👨\u200d👩\u200d👧\u200d👦", "👩🏽\u200d💻",
    "🏳\ufe0f\u200d🌈", "🏳\ufe0f\u200d⚧\ufe0f", "❤\ufe0f", "❤", "🇯🇵", "🇺🇸🇬🇧🇫🇷",
    "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "1\ufe0f\u20e32\ufe0f\u20e3#\ufe0f\u20e3",
    "🧑\u200d🚀", "👁\ufe0f\u200d🗨\ufe0f", "🐕\u200d🦺", "😂😂😂", "☕", "✨ sparkle ✨",
    "🤷\u200d♀\ufe0f", "🫠", "©\ufe0f ®\ufe0f ™\ufe0f",
]
ENTITIES = [
    "&amp;", "&lt;b&gt;", "&quot;quoted&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&amp;lt;",
    "&amp;#39;", "&amp;amp;amp;", "&copy; 2021", "&hellip;", "&eacute;", "&#8217;", "&#128512;",
    "&mdash;", "&bogus;", "& ampersand", "AT&T", "fish &amp; chips", "&lt;end_of_text&gt;",
    # ftfy leaves entities alone in text that looks like HTML, so only the double unescape decodes these.
    "<b>fish &amp;amp; chips</b>", "<i>&amp;lt;3</i>", "a < b &amp;amp;amp; c > d", "<p>caf&eacute;&amp;nbsp;</p>",
]
PUNCT = [
    "!!!", "?!?!", "...", "---", "***", "(((", ")))", "$$$", "@#%&*", "`~", "<<>>", "[]{}", "\\\\",
    "//", ";;", "::", "''", '""', "“curly”", "‘single’", "«guillemets»", "—–-", "…", "•", "§¶",
    "¡hola!", "¿qué?", "#hashtag", "@mention", "C++", "C#", "e-mail", "a/b/c", "x=y+1;", "100%",
    "</w>", "<|endoftext|>", "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "a<end_of_text>b",
]
NUMBERS = [
    "0", "7", "42", "1234567890", "3.14159", "1,000,000", "2nd 3rd 4th", "10:30pm", "1990s", "$19.99",
    "€100", "£5", "¥500", "₹20", "½ ¾", "x² y³", "٣٤٥", "१२३", "１２３", "Ⅻ", "⑤", "-273.15°C",
    "+1 (555) 010-9999", "2024-05-01T12:00:00Z", "0x1F600", "1e-9", "007", "99.9%",
]
CONTRACTIONS = [
    "it's", "don't", "they're", "we've", "i'm", "you'll", "he'd", "IT'S", "DON'T", "THEY'RE",
    "WE'VE", "I'M", "YOU'LL", "HE'D", "It'S", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
    "rock'n'roll", "o'clock", "'tis", "y'all'd've", "it’s", "won't", "can't", "dogs'", "'quoted'",
]
WHITESPACE = [
    "", " ", "  ", "\t", "\n", "\r\n", " \t\n ", "\u00a0", "\u3000", "\u200b", "\u2028", "\u2029",
    "\x85", "\x0b\x0c", "a\tb", "a\nb", "a\r\nb", "a   b", "  leading", "trailing  ", "a\u00a0b",
    "a\u200bb", "a\u2003b", "\ufeffbom", "zero\u200dwidth", "tab\t\tand\n\nnewline", "\x00nul", "\x1b[31mred\x1b[0m",
    "a\ud800b", "x\ude00\ud83dy", "\x7fdel", "soft\u00adhyphen",
]

WORDS = [w for phrase in SUBJECTS + VERBS + OBJECTS for w in phrase.split()]


def mojibake(text: str, codec: str) -> str:
    return text.encode("utf-8").decode(codec, errors="replace")


def caption(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
    style = rng.random()
    if style < 0.15:
        return text.upper()
    if style < 0.3:
        return text.title()
    if style < 0.4:
        return text[0].upper() + text[1:]
    return text


def fragment(rng: random.Random) -> str:
    pool = rng.choice([SUBJECTS, ACCENTED, SCRIPTS, EMOJI, ENTITIES, PUNCT, NUMBERS, CONTRACTIONS, WHITESPACE])
    return rng.choice(pool)


def long_text(rng: random.Random, n_words: int) -> str:
    parts = []
    for _ in range(n_words):
        parts.append(rng.choice(WORDS) if rng.random() < 0.8 else fragment(rng))
        parts.append(rng.choice([" ", " ", " ", ", ", "  ", "\n", "\t", ". "]))
    return "".join(parts)


def build() -> list[str]:
    rng = random.Random(20240501)
    corpus = []
    corpus += [caption(rng) for _ in range(300)]
    for pool in (ACCENTED, SCRIPTS, EMOJI, ENTITIES, PUNCT, NUMBERS, CONTRACTIONS, WHITESPACE):
        corpus += pool
        corpus += [f"{caption(rng)} {item}" for item in pool]
        corpus += [f"{item}{rng.choice(['', ' '])}{rng.choice(WORDS)}" for item in pool]
    # Mojibake as produced by mis-decoding UTF-8; ftfy repairs most of it.
    for text in ACCENTED + ["“quoted”", "it’s", "naïve café—really…", "😀 emoji", "Ñandú"]:
        corpus += [mojibake(text, "cp1252"), mojibake(text, "latin-1")]
    corpus += [mojibake(mojibake("déjà vu", "cp1252"), "cp1252"), "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows."]
    corpus += [" ".join(fragment(rng) for _ in range(rng.randint(2, 8))) for _ in range(250)]
    corpus += [long_text(rng, rng.randint(60, 150)) for _ in range(40)]
    corpus += [long_text(rng, rng.randint(200, 600)) for _ in range(10)]
    corpus += ["a " * 300, "supercalifragilisticexpialidocious" * 20, "😀" * 200, "一" * 600, "!" * 700]
    return list(dict.fromkeys(corpus))


def dump(text: str) -> str:
    def escape(ch: str) -> str:
        if ch == " " or unicodedata.category(ch)[0] not in "CZ":
            return ch
        code = ord(ch)
        if code > 0xFFFF:
            code -= 0x10000
            return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
        return f"\\u{code:04x}"

    return "".join(escape(ch) for ch in json.dumps(text, ensure_ascii=False))


def main() -> None:
    corpus = build()
    lines = [dump(t) for t in corpus]
    # JSON cannot keep every Python string (it merges an escaped surrogate pair into one character).
    assert [json.loads(line) for line in lines] == corpus, "corpus does not survive a JSON round trip"
    OUT.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(corpus)} strings to {OUT}")


if __name__ == "__main__":
    main()
