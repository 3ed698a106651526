"""Build Baton's builtin tokenizer: a small byte-level BPE in Hugging Face ``tokenizers`` format.

    python tools/make_tokenizer.py [--out shared/assets/tokenizer]

The corpus is made here, from the word lists below (written for this script) with Zipf-like
counts and no randomness; the trainer is a plain BPE whose ties go to the smaller pair of ids,
and the files are written with fixed key order. So two runs give byte-identical files
(tests/unit/test_tokenizer_assets.py checks it against the shipped copy).

Ids 0-3 are the special tokens, 4-259 the 256 bytes in byte order (so any input encodes), and
the rest are merges, up to VOCAB_SIZE ids in all.
"""

import argparse
import heapq
import itertools
import json
from collections import Counter
from pathlib import Path

from tokenizers import pre_tokenizers

from shared.tokenizer.byte_level import byte_to_char

VOCAB_SIZE = 6144
MODEL_MAX_LENGTH = 32768
END_OF_TEXT, START_OF_TEXT, IM_START, IM_END = (
    "<|endoftext|>",
    "<|startoftext|>",
    "<|im_start|>",
    "<|im_end|>",
)
SPECIAL_TOKENS = (END_OF_TEXT, START_OF_TEXT, IM_START, IM_END)

# ChatML with a leading bos (the post-processor adds bos too, so encode the rendered prompt with
# add_special_tokens=False). Message content reaches the template as a string.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unsupported role: ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def split_words(text: str) -> list[str]:
    """The whitespace-separated words of ``text``."""
    return text.split()


# Most frequent first; a word's count falls with its rank. Only VERBS and NOUNS are inflected.
WORDS = split_words("""
the of and to a in is that it for you was with on as have be at by not he this are or his from
we but they an she her which will one all would there their what so up out if about who get
more when can time no just him know take people into your good some could them see other than
then now only its over think also back after two how our first well way even new because any
these day most us were been being has had do does did done say said go went gone made find found
tell told ask seem feel try leave need keep let begin show hear run move live hold bring write sit
stand lose pay meet set lead understand speak read grow win buy die send build fall cut break eat
catch draw choose put men women children here very still too much many where again always really
however almost often something nothing everything someone anything why before through down off
away around today never yet ever quite once already both each every such may might must should
shall against without within during since until upon among toward across behind beyond above below
near per via though although unless whether either neither nor yes okay hello thanks please sorry
welcome between under while last long great little own old big high different small large next
early young important few public bad same able best better sure free true full special easy clear
recent certain personal open red difficult available likely short single medical current wrong
private past foreign fine common poor natural significant similar hot dead central happy serious
ready simple left physical general financial blue dark various entire close legal cold final main
green nice huge popular traditional cultural quick slow fast strong weak rich sad angry calm brave
proud kind warm cool wet dry clean dirty soft hard heavy light loud quiet bright sweet bitter fresh
empty beautiful wonderful terrible horrible excellent perfect strange familiar ancient modern
famous quickly slowly carefully easily finally suddenly usually probably certainly clearly simply
exactly north south east west top bottom middle inside outside front soon later tomorrow yesterday
monday tuesday wednesday thursday friday saturday sunday january february march april june july
august september october november december spring summer autumn winter
""")

# Regular verbs, inflected with -s, -ed and -ing (dropping a final e).
VERBS = split_words("""
use work look want call play believe happen provide include continue learn change follow create
allow add spend walk offer remember love consider appear wait serve expect stay reach remain
suggest raise pass require report decide pull return explain hope develop receive agree support
produce cover cause point list request reply stream decode compute cache queue answer finish start
open help talk turn end ask need seem move live watch listen jump climb cook clean fill form kill
laugh learn mark miss name order paint pick plant print push rain share smile sound test train
travel trust visit wash wish worry connect collect correct count deliver design describe discover
enjoy enter explore fix handle imagine improve install launch load measure notice observe perform
prepare prevent protect record refuse release remove repeat replace respond retry save
search select settle solve store stream touch update value view vote warn
""")

# Nouns, inflected with -s.
NOUNS = split_words("""
time year people way day thing man woman child world life hand part place case week company system
program question government number night point home water room mother area money story fact month
lot right study book eye job word business issue side kind head house service friend father power
hour game line end member law car city community name president team minute idea kid body
information school face level office door health person art war history party result morning
reason research girl guy moment air teacher force education foot boy age policy music market sense
nation plan college interest death experience effect class control field development role effort
rate heart leader light voice police mind price view town road paper data table text code file
value state problem group country student family model token request reply stream server client
user assistant tool chat queue worker router frontend cache block memory example summary detail
step letter sentence paragraph chapter title section note figure image picture color shape size
length width height weight speed distance direction position center star sky cloud snow wind storm
sea ocean river lake mountain hill forest tree flower grass stone rock sand island bridge street
village garden farm park beach desert valley animal bird fish dog cat horse cow pig chicken lion
tiger bear wolf fox rabbit snake whale bee ant food bread rice meat egg milk cheese butter sugar
salt apple orange banana grape lemon potato tomato carrot coffee tea juice wine beer soup cake
dinner lunch breakfast kitchen bedroom window wall floor chair desk bed lamp clock phone computer
screen keyboard camera radio television machine engine train plane ship boat bus bicycle truck
ticket station airport hotel hospital church library museum theater restaurant shop store bank
factory prison army navy soldier doctor nurse lawyer judge farmer driver artist writer singer
player scientist engineer manager king queen prince princess god spirit soul dream fear anger joy
peace truth lie beauty freedom justice language science nature society culture economy energy
solution method theory process network signal message packet protocol address response error
warning success failure status version update release feature function variable object module
package framework database query index key string integer float boolean array map tuple record
column row schema storage disk thread kernel device batch latency bandwidth capacity limit budget
deadline timeout
""")

# Common words and a few characters of other scripts, so that some tokens hold part of a
# multi-byte character (the detokenizer tests need those).
OTHER_WORDS = split_words("""
你好 世界 中国 我们 他们 时间 问题 今天 明天 谢谢 朋友 学生 老师 工作 学习 电脑 数据 模型
こんにちは ありがとう 日本 東京 さようなら 안녕하세요 감사합니다 한국 привет мир спасибо
bonjour merci café naïve résumé über straße größe niño señor año
😀 😂 👍 🙏 🎉 🔥 ❤️ ✨ 🚀 ✅ 🤖 🌍
""")

# Fragments other than words: numbers, punctuation, code and whitespace.
SYMBOLS = split_words(r"""
. , ! ? : ; ' " ( ) [ ] { } < > = + - * / % & | ^ ~ # @ $ _ \ `
... ." ", ?" !" ). ), (" ") ]) }) {" "} == != <= >= -> => += -= ** // && || :: </ /> <!-- -->
's 't 're 've 'm 'll 'd
0 1 2 3 4 5 6 7 8 9 10 11 12 15 20 24 25 30 32 50 64 100 128 200 256 500 512 1000 1024 2000
2020 2021 2022 2023 2024 2025 2026 4096 8192
def return import from class self None True False print async await yield lambda elif else
http https www com org json yaml html css null undefined const let var function
""")


def corpus_counts() -> Counter[str]:
    """Count of each pre-token (in byte-level spelling) in the generated corpus."""
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    fragments: Counter[str] = Counter()
    for words, suffixes in ((WORDS, ()), (VERBS, ("s", "ed", "ing")), (NOUNS, ("s",))):
        for rank, word in enumerate(words):
            count = 2_000_000 // (rank + 20)
            fragments[" " + word] += count
            fragments[word] += count // 3
            fragments[" " + word.capitalize()] += count // 5
            fragments[word.capitalize()] += count // 10
            for suffix in suffixes:
                fragments[" " + inflect(word, suffix)] += count // 4
    for rank, word in enumerate(OTHER_WORDS):
        fragments[word] += 4_000 // (rank + 4)
        fragments[" " + word] += 2_000 // (rank + 4)
    for rank, symbol in enumerate(SYMBOLS):
        fragments[symbol] += 60_000 // (rank + 10)
        fragments[" " + symbol] += 30_000 // (rank + 10)
    for num_spaces, count in ((1, 200), (2, 800), (3, 100), (4, 1_000), (8, 400)):
        fragments["\n" + " " * num_spaces + "x"] += count
    fragments["\n"] += 20_000
    fragments["\n\n"] += 5_000
    fragments["\t"] += 500
    counts: Counter[str] = Counter()
    for fragment, count in sorted(fragments.items()):
        for piece, _ in pre_tokenizer.pre_tokenize_str(fragment):
            counts[piece] += count
    return counts


def inflect(word: str, suffix: str) -> str:
    """``word`` + ``suffix`` (s, ed or ing) with the common English spelling rules."""
    consonant_y = word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u")
    if suffix == "s":
        if word.endswith(("s", "x", "z", "ch", "sh")):
            return word + "es"
        return word[:-1] + "ies" if consonant_y else word + "s"
    if suffix == "ed":
        if word.endswith("e"):
            return word + "d"
        return word[:-1] + "ied" if consonant_y else word + "ed"
    if word.endswith("e") and not word.endswith("ee"):
        return word[:-1] + "ing"
    return word + "ing"


def train_bpe(counts: Counter[str], vocab: list[str]) -> list[tuple[str, str]]:
    """Learn merges until ``vocab`` (extended in place) has VOCAB_SIZE tokens.

    Each step merges the most frequent adjacent pair, ties going to the smaller (left, right) id
    pair, so the result depends on nothing but the input.
    """
    token_ids = {token: token_id for token_id, token in enumerate(vocab)}
    words = [[token_ids[char] for char in piece] for piece in sorted(counts)]
    word_counts = [counts[piece] for piece in sorted(counts)]
    pair_counts: Counter[tuple[int, int]] = Counter()
    pair_words: dict[tuple[int, int], set[int]] = {}
    for word_index, word in enumerate(words):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += word_counts[word_index]
            pair_words.setdefault(pair, set()).add(word_index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(vocab) < VOCAB_SIZE and heap:
        negative_count, pair = heapq.heappop(heap)
        if -negative_count != pair_counts[pair] or -negative_count < 2:
            continue  # a stale entry, or nothing left worth merging
        left, right = vocab[pair[0]], vocab[pair[1]]
        merged = left + right
        if merged not in token_ids:
            token_ids[merged] = len(vocab)
            vocab.append(merged)
        merges.append((left, right))
        changed: set[tuple[int, int]] = set()
        for word_index in sorted(pair_words.pop(pair)):
            old = words[word_index]
            new = merge_pair(old, pair, token_ids[merged])
            if new == old:
                continue
            count = word_counts[word_index]
            for old_pair in itertools.pairwise(old):
                pair_counts[old_pair] -= count
                changed.add(old_pair)
            for new_pair in itertools.pairwise(new):
                pair_counts[new_pair] += count
                pair_words.setdefault(new_pair, set()).add(word_index)
                changed.add(new_pair)
            words[word_index] = new
        for changed_pair in sorted(changed):
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
    return merges


def merge_pair(word: list[int], pair: tuple[int, int], merged_id: int) -> list[int]:
    """``word`` with each occurrence of ``pair``, left to right, replaced by ``merged_id``."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def tokenizer_json(vocab: list[str], merges: list[tuple[str, str]]) -> dict[str, object]:
    """The tokenizer.json document (the ``tokenizers`` 1.0 serialization)."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bos = {"SpecialToken": {"id": START_OF_TEXT, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": SPECIAL_TOKENS.index(token),
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for token in SPECIAL_TOKENS
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", **byte_level, "trim_offsets": False},
                {
                    "type": "TemplateProcessing",
                    "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [
                        bos,
                        {"Sequence": {"id": "A", "type_id": 0}},
                        bos,
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {
                        START_OF_TEXT: {
                            "id": START_OF_TEXT,
                            "ids": [SPECIAL_TOKENS.index(START_OF_TEXT)],
                            "tokens": [START_OF_TEXT],
                        }
                    },
                },
            ],
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: token_id for token_id, token in enumerate(vocab)},
            # Byte-level tokens never hold a plain space, so "left right" is unambiguous.
            "merges": [f"{left} {right}" for left, right in merges],
        },
    }


def config_files() -> dict[str, dict[str, object]]:
    """tokenizer_config.json and generation_config.json."""
    return {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": START_OF_TEXT,
            "eos_token": IM_END,
            "pad_token": END_OF_TEXT,
            "model_max_length": MODEL_MAX_LENGTH,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
        "generation_config.json": {
            "bos_token_id": SPECIAL_TOKENS.index(START_OF_TEXT),
            "eos_token_id": [SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(END_OF_TEXT)],
        },
    }


def write_json(path: Path, document: dict[str, object]) -> None:
    """Write ``document`` as UTF-8 JSON with a fixed layout."""
    text = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    path.write_bytes(text.encode())


def build(out_dir: Path) -> None:
    """Train the tokenizer and write its three files into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL_TOKENS, *byte_to_char()]
    merges = train_bpe(corpus_counts(), vocab)
    write_json(out_dir / "tokenizer.json", tokenizer_json(vocab, merges))
    for name, document in config_files().items():
        write_json(out_dir / name, document)
    print(f"wrote {out_dir}: {len(vocab)} tokens, {len(merges)} merges")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent / "shared" / "assets" / "tokenizer"
    parser.add_argument("--out", type=Path, default=default_out, help="output directory")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
