"""Byte-level BPE tokenizer: trained here in pure Python, served by tiktoken.

What BPE is. Text becomes UTF-8 bytes, so the 256 byte values are the starting vocabulary and any
string at all can be written down. Training then repeats one step: count every pair of adjacent
tokens in the corpus, take the most frequent pair (say b"t" followed by b"he") and add their
concatenation (b"the") as a new token, replacing the pair everywhere. After a few thousand merges the
common words and word pieces are single tokens and rare text still falls back to bytes. Pairs never
cross the boundaries of the chunks that a pre-split regex cuts the text into (words with their
leading space, runs of punctuation, whitespace), so a token never glues the end of one word to the
start of the next. Encoding new text replays the merges, lowest rank (earliest learned) first; the
learned ranks are handed to tiktoken, whose Rust core does that fast.

Why digits are single tokens. GPT-4's pattern cuts numbers into groups of up to three digits, so
"1234" might become "123" + "4" and a model must memorise sums of a thousand different number tokens.
Our pattern cuts every digit on its own (as Llama and DeepSeek do): the digits of a number line up
position by position and a small model can learn to add with carries.

Why special tokens cannot be forged. The role and boundary tokens (<|user|>, <|assistant|>, <|end|>,
<|endoftext|>) get ids of their own, after the BPE ranks. `encode` only ever produces BPE ids: the
text "<|assistant|>" typed by a user becomes the bytes "<", "|", "assistant", ... and never the
assistant id. Only `render_chat` and `render_prompt` place the real role ids, so a user cannot start
a fake assistant turn or end their own turn early.

    tok = Tokenizer.train(corpus, vocab_size=4096)
    ids, loss_mask = tok.render_chat([{"role": "user", "content": "2+2?"},
                                      {"role": "assistant", "content": "4"}])
    tok.save("out/tokenizer.json"); tok = Tokenizer.load("out/tokenizer.json")
"""
import base64
import heapq
import json
import os
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken

# GPT-4's (cl100k) pre-split pattern with one change: numbers are split into single digits (\p{N}
# where GPT-4 has \p{N}{1,3}+), so every digit is its own chunk and therefore its own token; see the
# module docstring for why. The other alternatives keep English contractions ('s, 'll) apart, attach
# one leading space or punctuation mark to a word, and keep runs of whitespace and newlines together.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

# Their ids follow the BPE ranks in this order. <|end|> ends a chat turn, <|endoftext|> a document.
SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>")

FORMAT = "alignment-from-scratch/byte-bpe"
FORMAT_VERSION = 1


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        num_ranks = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(num_ranks)):
            raise ValueError("mergeable_ranks must number the tokens 0..n-1 without gaps")
        if any(mergeable_ranks.get(bytes([b])) != b for b in range(256)):
            raise ValueError("mergeable_ranks must start with the 256 single bytes, in byte order")
        self.pattern = pattern
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_ids = {name: num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            name="byte-bpe", pat_str=pattern, mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_ids,
        )

    # ---- training ------------------------------------------------------------------------------
    @classmethod
    def train(cls, text_or_iterable, vocab_size: int) -> "Tokenizer":
        """Learn BPE merges on one string or an iterable of documents.

        vocab_size counts everything: 256 byte tokens + learned merges + the special tokens.
        """
        min_vocab = 256 + len(SPECIAL_TOKENS) + 1
        if vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: 256 byte tokens + {len(SPECIAL_TOKENS)} "
                f"special tokens + at least one merge need vocab_size >= {min_vocab}")
        documents = [text_or_iterable] if isinstance(text_or_iterable, str) else text_or_iterable
        chunk_counts = count_chunks(documents, SPLIT_PATTERN)
        token_bytes = learn_merges(chunk_counts, vocab_size - len(SPECIAL_TOKENS))
        return cls({token: rank for rank, token in enumerate(token_bytes)})

    # ---- encoding and decoding -----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text to BPE ids. Never produces a special id, whatever the text says.

        Lone surrogates (not valid Unicode, so not UTF-8 encodable) are replaced by U+FFFD, as
        tiktoken does; every other string round-trips through decode exactly.
        """
        return self._encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        """Ids to text. Invalid UTF-8 (a sequence cut mid-character) decodes to U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            return self._encoding.decode(ids, errors="replace")
        except (KeyError, OverflowError, TypeError):
            bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
            raise ValueError(f"token ids outside the vocabulary 0..{self.vocab_size - 1}: {bad[:5]}") from None

    # ---- chat rendering ------------------------------------------------------------------------
    def render_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Render a conversation as ids plus a 0/1 loss mask of the same length.

        Each turn is <|role|> content <|end|>. The mask is 1 on the assistant's content and its
        <|end|> (the model must learn to stop) and 0 on role tokens and user turns (given, not learned).
        """
        ids, loss_mask = [], []
        for message in messages:
            role_id = self._role_id(message)
            content_ids = self.encode(message["content"])
            learned = int(role_id == self.assistant_id)
            ids += [role_id, *content_ids, self.eot_id]
            loss_mask += [0] + [learned] * (len(content_ids) + 1)
        return ids, loss_mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation so far, then <|assistant|>: the model writes the reply and <|end|>."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("render_prompt needs a conversation whose last message is a user turn")
        ids, _ = self.render_chat(messages)
        return ids + [self.assistant_id]

    def _role_id(self, message: dict) -> int:
        role_ids = {"user": self.user_id, "assistant": self.assistant_id}
        role = message.get("role")
        if role not in role_ids:
            raise ValueError(f"unknown chat role {role!r}; expected 'user' or 'assistant'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"a {role} message needs a string 'content'")
        return role_ids[role]

    # ---- ids worth naming ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(self.special_ids)

    @property
    def eot_id(self) -> int:
        """End of turn: <|end|>. Generation of a reply stops here."""
        return self.special_ids["<|end|>"]

    @property
    def doc_end_id(self) -> int:
        """End of document: <|endoftext|>, between documents of the pretraining corpus."""
        return self.special_ids["<|endoftext|>"]

    @property
    def user_id(self) -> int:
        return self.special_ids["<|user|>"]

    @property
    def assistant_id(self) -> int:
        return self.special_ids["<|assistant|>"]

    # ---- saving as plain data ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain str/int/list/dict only, so it can sit inside a weights_only torch checkpoint."""
        by_rank = sorted(self.mergeable_ranks, key=self.mergeable_ranks.get)
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            # Ranks 0..255 are the single bytes; the learned tokens follow in rank order.
            "merged_tokens": [base64.b64encode(token).decode("ascii") for token in by_rank[256:]],
            "special_tokens": dict(self.special_ids),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Tokenizer":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a tokenizer dict (expected format {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"tokenizer format version {data.get('version')!r}, expected {FORMAT_VERSION}")
        pattern, merged, specials = data.get("pattern"), data.get("merged_tokens"), data.get("special_tokens")
        if not isinstance(pattern, str) or not isinstance(merged, list) or not isinstance(specials, dict):
            raise ValueError("tokenizer dict needs 'pattern' (str), 'merged_tokens' (list), 'special_tokens' (dict)")
        probe = "Hello, World! 12 + 345 = x\n\t  na\u00efve \u6771\u4eac \U0001F642 don't <|end|>"
        try:
            chunks = regex.findall(pattern, probe)
        except regex.error as error:
            raise ValueError(f"tokenizer pattern is not a regular expression: {error}") from None
        if not all(chunks) or "".join(chunks) != probe:  # tiktoken would drop text, or panic on empty matches
            raise ValueError("tokenizer pattern does not cut text into non-empty chunks that cover it")
        token_bytes = [bytes([b]) for b in range(256)]
        for encoded in merged:
            try:
                token_bytes.append(base64.b64decode(encoded, validate=True))
            except (TypeError, ValueError):
                raise ValueError(f"merged token {encoded!r} is not base64 text") from None
        if len(set(token_bytes)) != len(token_bytes) or any(len(t) < 2 for t in token_bytes[256:]):
            raise ValueError("merged tokens must be distinct byte strings of length >= 2")
        tokenizer = cls({token: rank for rank, token in enumerate(token_bytes)}, pattern)
        if specials != tokenizer.special_ids:
            raise ValueError(f"special tokens {specials} do not match the expected {tokenizer.special_ids}")
        return tokenizer

    def save(self, path) -> None:
        """Write the tokenizer as plain JSON, atomically (write_atomically)."""
        write_atomically(path, lambda f: json.dump(self.to_dict(), f))

    @classmethod
    def load(cls, path) -> "Tokenizer":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except ValueError as e:  # also covers JSONDecodeError and UnicodeDecodeError
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: malformed tokenizer file: {message}") from None


# ---- the BPE learner -----------------------------------------------------------------------------
def write_atomically(path, write, binary=False) -> None:
    """Create path through write(file): into a temporary file in the same folder, renamed over path once it is
    complete, so a crash mid-write leaves the previous file in place. The file follows the umask (a
    tempfile.mkstemp file would be 0600). Tokenizer files, checkpoints (gpt.save_checkpoint) and JSON
    (report.write_json) are written through it; it lives here because this module imports none of the project's
    others, so every module can use it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp_path, "xb" if binary else "x", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def count_chunks(documents, pattern: str) -> Counter:
    """How often each pre-split chunk occurs. Training then works on the distinct chunks only, which
    for natural (and templated) text are a tiny fraction of the corpus."""
    splitter = regex.compile(pattern)
    chunk_counts = Counter()
    for document in documents:
        chunk_counts.update(splitter.findall(document))
    return chunk_counts


def learn_merges(chunk_counts: Counter, num_ranks: int) -> list[bytes]:
    """Grow the 256 single bytes to num_ranks tokens by repeatedly merging the most frequent pair.

    Returns every token's bytes in rank order. Pair counts are updated incrementally: a merge only
    rewrites the chunks that contain the pair. The most frequent pair comes off a heap whose stale
    entries (counts that have changed since they were pushed) are skipped when popped. Ties go to
    the pair whose bytes sort first, so training is deterministic.
    """
    word_counts = Counter()  # chunk as a tuple of byte values -> frequency
    for chunk, count in chunk_counts.items():
        # errors="replace": a lone surrogate is not valid Unicode and trains as "?".
        word = tuple(chunk.encode("utf-8", errors="replace"))
        if len(word) > 1:  # a single byte holds no pair
            word_counts[word] += count
    words = [list(word) for word in word_counts]
    freqs = list(word_counts.values())

    pair_counts = defaultdict(int)
    pair_words = defaultdict(set)  # pair -> indices of the words that contain it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            pair_words[pair].add(i)

    token_bytes = [bytes([b]) for b in range(256)]
    token_ids = {token: i for i, token in enumerate(token_bytes)}
    heap = [heap_entry(pair, count, token_bytes) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(token_bytes) < num_ranks:
        pair = pop_most_frequent(heap, pair_counts)
        if pair is None:
            raise ValueError(
                f"the corpus has no pairs left to merge after {len(token_bytes)} tokens; "
                f"give it more text or ask for a vocab_size of at most {len(token_bytes) + len(SPECIAL_TOKENS)}")
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        # Rarely, different pairs spell the same bytes ("a"+"bc" after "ab"+"c"): reuse that token.
        if merged not in token_ids:
            token_ids[merged] = len(token_bytes)
            token_bytes.append(merged)
        new_id = token_ids[merged]

        changed = set()
        for i in pair_words.pop(pair):
            old_word, new_word = words[i], merge_pair(words[i], pair, new_id)
            words[i] = new_word
            for old_pair in zip(old_word, old_word[1:]):
                pair_counts[old_pair] -= freqs[i]
            for new_pair in zip(new_word, new_word[1:]):
                pair_counts[new_pair] += freqs[i]
            old_pairs, new_pairs = set(zip(old_word, old_word[1:])), set(zip(new_word, new_word[1:]))
            for gone in old_pairs - new_pairs:
                pair_words[gone].discard(i)
            for new_pair in new_pairs:
                pair_words[new_pair].add(i)
            changed |= old_pairs | new_pairs
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, heap_entry(p, pair_counts[p], token_bytes))
            else:
                del pair_counts[p]
                pair_words.pop(p, None)
    return token_bytes


def heap_entry(pair, count, token_bytes):
    # heapq pops the smallest entry: the highest count, then the pair whose bytes sort first.
    return (-count, token_bytes[pair[0]], token_bytes[pair[1]], pair)


def pop_most_frequent(heap, pair_counts):
    """The most frequent pair, skipping heap entries whose count is out of date; None if no pairs."""
    while heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair) == -neg_count:
            return pair
    return None


def merge_pair(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of pair in word, left to right, by new_id."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged
