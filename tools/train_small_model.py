"""Trains the small Griffin shipped as `presets/griffin_tiny_pydocs_en`.

One reproducible run, start to finish:

1. Corpus: the reStructuredText sources of the Python 3.11 documentation, from
   Debian's `python3.11-doc` package (`apt-get download`, `dpkg-deb -x`), or an
   already extracted tree given with `--corpus-dir`.
2. Cleaning to English prose: directives, literal and indented code blocks,
   tables, headings and list-dump files go; roles become their plain text;
   only paragraphs that are mostly words stay. Whole files are held out by a
   stable hash of their path, so held-out text never reaches the vocabulary
   or the model.
3. A SentencePiece unigram vocabulary trained on the training text only.
4. A small `RecurrentGemmaBackbone` (recurrent, recurrent, attention, ...)
   trained from scratch with `model.fit` on the JAX backend, on documents
   packed into fixed windows (`segment_pos` restarts at each document).
5. Held-out perplexity and bits per character, against a unigram baseline,
   and a few greedy and top-k samples.
6. `save_to_preset`, a README.md model card and metrics.json, and a check
   that the preset loads and generates on JAX, TensorFlow and torch.

Run from the repository root:

    python tools/train_small_model.py                # everything (~40 min)
    python tools/train_small_model.py --benchmark 20  # time a few steps only

The script always trains on JAX (it sets `KERAS_BACKEND=jax` before Keras is
imported); the backend check runs in subprocesses.
"""

import argparse
import glob
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEB_PACKAGE = "python3.11-doc"
DEB_VERSION = "3.11.2-6+deb12u8"
SOURCES_SUBDIR = os.path.join("usr", "share", "doc", "python3.11", "html", "_sources")
COPYRIGHT_SUBDIR = os.path.join("usr", "share", "doc", "python3.11-doc", "copyright")
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "presets", "griffin_tiny_pydocs_en")
PROMPTS = ("The function", "In this tutorial, we", "Python is")
PAD, EOS, BOS, UNK = 0, 1, 2, 3


# --- 1. Corpus ----------------------------------------------------------------


def run(command, **kwargs):
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def fetch_corpus(work_dir):
    """Downloads and extracts the pinned `python3.11-doc`; returns the root."""
    root = os.path.join(work_dir, "deb")
    os.makedirs(root, exist_ok=True)
    deb = os.path.join(root, f"{DEB_PACKAGE}_{DEB_VERSION}_all.deb")
    if not os.path.exists(deb):
        # The version is pinned: another one would be another corpus.
        run(["apt-get", "download", f"{DEB_PACKAGE}={DEB_VERSION}"], cwd=root)
        # apt-get names the file with the epoch-free, %-escaped version.
        found = glob.glob(os.path.join(root, f"{DEB_PACKAGE}_*_all.deb"))
        if len(found) != 1:
            raise RuntimeError(f"Expected one downloaded .deb in {root}: {found}")
        os.rename(found[0], deb)
    version = subprocess.run(
        ["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if version != DEB_VERSION:
        raise RuntimeError(f"{deb} is version {version}, expected {DEB_VERSION}.")
    extracted = os.path.join(root, "x")
    if not os.path.isdir(os.path.join(extracted, SOURCES_SUBDIR)):
        run(["dpkg-deb", "-x", deb, extracted])
    return extracted


def sources_dir(corpus_dir):
    """Accepts the extracted package root or the `_sources` folder itself."""
    for candidate in (os.path.join(corpus_dir, SOURCES_SUBDIR), corpus_dir):
        if glob.glob(os.path.join(candidate, "**", "*.rst.txt"), recursive=True):
            return candidate
    raise ValueError(f"{corpus_dir}: no *.rst.txt files (expected {SOURCES_SUBDIR}).")


def package_version(corpus_dir):
    """The Debian version, read from the tree's changelog, or `None`."""
    import gzip

    path = os.path.join(
        corpus_dir, "usr", "share", "doc", "python3.11-doc", "changelog.Debian.gz"
    )
    if not os.path.exists(path):
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        match = re.match(r"\S+ \(([^)]+)\)", f.readline())
    return match.group(1) if match else None


# --- 2. Cleaning ----------------------------------------------------------------

# Directives whose body is prose about the thing they declare (the signature
# on the directive line itself is dropped).
PROSE_DIRECTIVES = {
    "note", "warning", "important", "caution", "tip", "hint", "attention",
    "danger", "error", "seealso", "impl-detail", "topic", "sidebar", "only",
    "epigraph", "glossary", "admonition", "container", "centered",
}  # fmt: skip
VERSION_DIRECTIVES = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}:",
}
# Directives whose body is code, markup or metadata, never prose.
DROPPED_DIRECTIVES = {
    "index", "code-block", "sourcecode", "code", "doctest", "testcode",
    "testsetup", "testoutput", "testcleanup", "productionlist", "toctree",
    "include", "literalinclude", "tabularcolumns", "list-table", "table",
    "csv-table", "highlight", "module", "currentmodule", "sectionauthor",
    "moduleauthor", "program", "contents", "image", "figure", "parsed-literal",
    "raw", "miscnews", "limited-api-list", "math", "availability",
    "audit-event", "rubric", "c:namespace", "literal", "digraph", "graphviz",
}  # fmt: skip

DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::(?:\s+(.*))?$")
EXPLICIT_MARKUP = re.compile(r"^(\s*)\.\.(\s|$)")
LABEL = re.compile(r"^\s*\.\.\s+_([^:]+):\s*$")
BULLET = re.compile(r"^(\s*)([*+-]|#\.|\d+\.|\(\d+\)|[a-z]\.)\s+\S")
ADORNMENT = re.compile(r"^\s*([=\-~^\"'*#+`:.<>_])\1{2,}\s*$")
GRID_TABLE = re.compile(r"^\s*\+[-=+]+\+\s*$")
SIMPLE_TABLE = re.compile(r"^\s*=+(\s+=+)+\s*$")
FIELD = re.compile(r"^\s*:[\w -]+:(\s|$)")
OPTION_LINE = re.compile(r"^\s*:[\w-]+:")

PROTECTED = re.compile(r"``(.+?)``|:(?:[\w-]+:)*([\w-]+):`((?:[^`\\]|\\.)+)`")
# `name_`: a reference to a target named elsewhere; the name is the text.
REFERENCE = re.compile(r"(?<=[A-Za-z0-9])_(?=[\s.,;:)]|$)")
HYPERLINK = re.compile(r"`([^`<]*?)\s*(?:<[^>`]*>)?`__?")
INTERPRETED = re.compile(r"`([^`]+)`")
FOOTNOTE_REF = re.compile(r"\s*\[(?:#[\w-]*|\d+|\*)\]_")
STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
EMPHASIS = re.compile(r"(?<![\w*\\])\*(\S(?:.*?\S)?)\*(?![\w*])")
SUBSTITUTION = re.compile(r"\|([\w -]+)\|")
WORD = re.compile(r"^[\"'(\[]*[A-Za-z]+(?:[-'’][A-Za-z]+)*[\"'’)\]]*[.,;:!?]*[\"')]*$")
STOPWORDS = {"the", "a", "an", "is", "are", "to", "of", "and", "in", "it", "be"}
# Roles that Sphinx renders with "()" after the name.
CALLABLE_ROLES = {"func", "meth"}


def indent_of(line):
    return len(line) - len(line.lstrip(" "))


def block_end(lines, start, indent):
    """First index from `start` of a non-blank line indented `<= indent`."""
    i = start
    while i < len(lines) and (not lines[i].strip() or indent_of(lines[i]) > indent):
        i += 1
    return i


def dedent(lines):
    widths = [indent_of(line) for line in lines if line.strip()]
    cut = min(widths) if widths else 0
    return [line[cut:] for line in lines]


def collect_labels(text):
    """Maps `.. _label:` targets to the title of the heading that follows."""
    lines = text.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        match = LABEL.match(line)
        if not match:
            continue
        following = [s for s in lines[i + 1 : i + 8] if s.strip()]
        following = [s for s in following if not LABEL.match(s)]
        if ADORNMENT.match(following[0] if following else ""):
            following = following[1:]  # an overline
        if len(following) >= 2 and ADORNMENT.match(following[1]):
            labels[match.group(1).strip().lower()] = following[0].strip()
    return labels


class RstToProse:
    """Turns one reST file into a list of prose paragraphs (plain text)."""

    def __init__(self, labels):
        # Titles from every file, so that :ref:`label` reads as Sphinx shows it.
        self.labels = labels

    def __call__(self, text):
        lines = text.expandtabs(8).splitlines()
        lines = [line.rstrip() for line in lines]
        paragraphs = []
        self._parse(lines, paragraphs)
        prose = []
        for paragraph in paragraphs:
            paragraph = self.inline(paragraph)
            if is_prose(paragraph):
                prose.append(paragraph)
        return prose

    def _parse(self, lines, out):
        i, n = 0, len(lines)
        while i < n:
            line = lines[i]
            if not line.strip():
                i += 1
                continue
            indent = indent_of(line)
            end = block_end(lines, i + 1, indent)
            directive = DIRECTIVE.match(line)
            if directive:
                self._directive(directive, lines[i + 1 : end], out)
                i = end
            elif EXPLICIT_MARKUP.match(line):
                i = end  # comment, label, hyperlink target, footnote, subst.
            elif GRID_TABLE.match(line):
                while i < n and lines[i].strip():
                    i += 1
            elif SIMPLE_TABLE.match(line):
                i = self._skip_simple_table(lines, i)
            elif BULLET.match(line):
                # The item's text starts where the marker's text starts.
                width = BULLET.match(line).end() - 1
                item = [" " * width + line[width:]] + lines[i + 1 : end]
                self._parse(dedent(item), out)
                i = end
            else:
                i = self._paragraph(lines, i, out)

    def _paragraph(self, lines, i, out):
        n = len(lines)
        indent = indent_of(lines[i])
        start = i
        while i < n and lines[i].strip() and indent_of(lines[i]) == indent:
            i += 1
        para = [s.strip() for s in lines[start:i]]
        if i < n and lines[i].strip() and indent_of(lines[i]) > indent:
            # A definition list item: the term, then its indented definition.
            end = block_end(lines, i, indent)
            self._parse(dedent(lines[i:end]), out)
            return end
        # A paragraph ending in "::" introduces a literal block: skip it.
        literal = para[-1].endswith("::")
        if literal:
            para[-1] = para[-1][:-2].rstrip()
            if para[-1] and not lines[i - 1].rstrip().endswith(" ::"):
                para[-1] += ":"
        if any(ADORNMENT.match(s) for s in para):
            pass  # a heading or a transition
        elif para[0].startswith(">>>") or FIELD.match(para[0]):
            pass  # doctest or field list
        elif para[-1] or len(para) > 1:
            out.append(" ".join(s for s in para if s))
        # Skip blank lines, then any block indented deeper (code or quote).
        j = i
        while j < n and not lines[j].strip():
            j += 1
        if j < n and indent_of(lines[j]) > indent:
            end = block_end(lines, j, indent)
            if not literal:
                self._parse(dedent(lines[j:end]), out)
            return end
        return j

    @staticmethod
    def _skip_simple_table(lines, i):
        # Border, rows (blank lines allowed), ..., closing border + blank.
        j = i + 1
        while j < len(lines):
            if SIMPLE_TABLE.match(lines[j]) and (
                j + 1 == len(lines) or not lines[j + 1].strip()
            ):
                return j + 1
            j += 1
        return j

    def _directive(self, match, body, out):
        name, argument = match.group(2), (match.group(3) or "").strip()
        if name in DROPPED_DIRECTIVES:
            return
        # Options come right after the directive line.
        k = 0
        while k < len(body) and OPTION_LINE.match(body[k]):
            k += 1
        body = body[k:]
        if name in VERSION_DIRECTIVES:
            version = argument.split()[0] if argument else ""
            rest = argument[len(version) :].strip()
            content = dedent(body)
            paragraphs = []
            self._parse(([rest] if rest else []) + content, paragraphs)
            prefix = VERSION_DIRECTIVES[name].format(version)
            if paragraphs:
                paragraphs[0] = f"{prefix} {paragraphs[0]}"
            out.extend(paragraphs)
            return
        if name not in PROSE_DIRECTIVES:
            # Signatures and titles continue up to the first blank line.
            while body and body[0].strip():
                body = body[1:]
        self._parse(dedent(body), out)

    def inline(self, text):
        """Plain text of a paragraph's inline markup."""
        # Literals and roles are taken verbatim; markup rules apply between.
        pieces, pos = [], 0
        for match in PROTECTED.finditer(text):
            pieces.append(self._markup(text[pos : match.start()]))
            if match.group(1) is not None:
                pieces.append(match.group(1))
            else:
                pieces.append(self._role(match.group(2), match.group(3)))
            pos = match.end()
        pieces.append(self._markup(text[pos:]))
        return re.sub(r"\s+", " ", "".join(pieces)).strip()

    @staticmethod
    def _markup(text):
        text = HYPERLINK.sub(r"\1", text)
        text = INTERPRETED.sub(r"\1", text)
        text = FOOTNOTE_REF.sub("", text)
        text = REFERENCE.sub("", text)
        text = STRONG.sub(r"\1", text)
        text = EMPHASIS.sub(r"\1", text)
        text = SUBSTITUTION.sub(_substitution, text)
        text = text.replace("\\ ", "")
        return re.sub(r"\\(.)", r"\1", text)

    def _role(self, role, content):
        content = content.replace("\\", "")
        content = content.lstrip("!")
        titled = re.match(r"^(.*?)\s*<([^<>]+)>$", content, re.S)
        if titled and titled.group(1):
            return titled.group(1)
        target = titled.group(2) if titled else content
        if role in ("ref", "doc"):
            title = self.labels.get(target.lower())
            return title if title else target.rsplit("/", 1)[-1].replace("-", " ")
        if role == "pep":
            return "PEP " + target.split("#")[0]
        if role == "rfc":
            return "RFC " + target.split("#")[0]
        if role == "issue":
            return "bpo-" + target
        if role == "gh":
            return "gh-" + target
        if role == "samp":
            return target.replace("{", "").replace("}", "")
        if role == "abbr":
            return target.split(" (")[0]
        if target.startswith("~"):
            target = target[1:].rsplit(".", 1)[-1]
        if role in CALLABLE_ROLES and not target.endswith(")"):
            target += "()"
        return target


def _substitution(match):
    name = match.group(1)
    return "3.11" if name in ("release", "version") else name


def is_prose(paragraph):
    """A paragraph of English sentences: mostly plain words, some stopwords."""
    tokens = paragraph.split()
    if len(tokens) < 8:
        return False
    words = [t for t in tokens if WORD.match(t)]
    if len(words) < 0.75 * len(tokens):
        return False
    lowered = {w.strip("\"'()[].,;:!?").lower() for w in words}
    if not lowered & STOPWORDS:
        return False
    ascii_chars = sum(c.isascii() for c in paragraph)
    return ascii_chars >= 0.98 * len(paragraph)


def list_fraction(text):
    """Share of a file's non-blank lines that start list items."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return sum(bool(BULLET.match(line)) for line in lines) / len(lines)


def is_held_out(relpath, percent):
    # A stable hash of the path, not Python's salted `hash()`.
    digest = hashlib.sha256(relpath.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 10_000 < percent * 100


def build_corpus(src, held_out_percent, max_list_fraction=0.4):
    """Cleans every file; returns `(train, held_out, report)`.

    `train` and `held_out` are lists of `(relpath, text)`, sorted by path;
    `text` holds the file's prose paragraphs, one per line.
    """
    paths = sorted(glob.glob(os.path.join(src, "**", "*.rst.txt"), recursive=True))
    texts = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            texts[os.path.relpath(path, src)] = f.read()
    labels = {}
    for text in texts.values():
        labels.update(collect_labels(text))
    cleaner = RstToProse(labels)
    # Titles carry markup too (":keyword:`!match` Statements").
    cleaner.labels = {k: cleaner.inline(v) for k, v in labels.items()}
    train, held_out, skipped = [], [], []
    raw_chars = 0
    for relpath, text in texts.items():
        raw_chars += len(text)
        if list_fraction(text) > max_list_fraction:
            skipped.append(relpath)  # a changelog-like dump of list items
            continue
        paragraphs = cleaner(text)
        if not paragraphs:
            skipped.append(relpath)
            continue
        doc = (relpath, "\n".join(paragraphs))
        (held_out if is_held_out(relpath, held_out_percent) else train).append(doc)
    report = {
        "files": len(paths),
        "raw_chars": raw_chars,
        "files_dropped": skipped,
        "train_files": len(train),
        "held_out_files": [p for p, _ in held_out],
        "train_chars": sum(len(t) for _, t in train),
        "held_out_chars": sum(len(t) for _, t in held_out),
    }
    return train, held_out, report


# --- 3. Vocabulary ------------------------------------------------------------


def train_tokenizer(train_docs, vocab_size, seed):
    """A unigram SentencePiece model of the training text; returns its bytes."""
    import sentencepiece as spm

    sentences = [p for _, text in train_docs for p in text.split("\n")]
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,  # no <unk> for rare characters: they become bytes
        split_digits=True,
        max_sentence_length=1 << 15,  # whole paragraphs, never skipped
        # RecurrentGemmaTokenizer looks its special tokens up by these names.
        pad_id=PAD,
        eos_id=EOS,
        bos_id=BOS,
        unk_id=UNK,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        num_threads=1,  # multi-threaded EM sums in a varying order
        minloglevel=2,
    )
    return model.getvalue()


def encode_docs(processor, docs):
    """Each document as `<bos> ... <eos>` token ids."""
    return [
        np.array([BOS] + processor.encode(text) + [EOS], dtype=np.int32)
        for _, text in docs
    ]


# --- 4. Training --------------------------------------------------------------


class PackedWindows:
    """Endless training batches of documents packed into fixed windows.

    Each epoch concatenates the documents in a fresh seeded order and cuts the
    stream into `sequence_length` windows, visited in a seeded order too.
    `segment_pos` counts each token's place in its document, so the recurrence
    and attention restart at every `<bos>` (a window cut mid-document just
    starts from an empty state). Targets are the next tokens; the `<bos>` that
    follows an `<eos>` is not predictable and has weight 0.
    """

    def __init__(self, docs, sequence_length, batch_size, seed):
        self.docs = docs
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.seed = seed
        total = sum(len(d) for d in docs)
        self.windows_per_epoch = (total - 1) // sequence_length
        self._epoch = None

    def _load_epoch(self, epoch):
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1:]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.docs))
        tokens = np.concatenate([self.docs[i] for i in order])
        positions = np.concatenate(
            [np.arange(len(self.docs[i]), dtype=np.int32) for i in order]
        )
        windows = rng.permutation(self.windows_per_epoch)
        self._epoch = (epoch, tokens, positions, windows)
        return tokens, positions, windows

    def batch(self, index):
        length = self.sequence_length
        x = np.empty((self.batch_size, length), np.int32)
        y = np.empty((self.batch_size, length), np.int32)
        segment_pos = np.empty((self.batch_size, length), np.int32)
        for row in range(self.batch_size):
            epoch, k = divmod(index * self.batch_size + row, self.windows_per_epoch)
            tokens, positions, windows = self._load_epoch(epoch)
            start = windows[k] * length
            x[row] = tokens[start : start + length]
            y[row] = tokens[start + 1 : start + length + 1]
            segment_pos[row] = positions[start : start + length]
        inputs = {
            "token_ids": x,
            "padding_mask": np.ones_like(x),
            "segment_pos": segment_pos,
        }
        return inputs, y, (y != BOS).astype(np.float32)

    def dataset(self):
        """An endless `tf.data.Dataset` of the batches, in order.

        KerasHub's `CausalLM.fit` takes arrays or datasets, not generators.
        """
        import tensorflow as tf

        def batches():
            index = 0
            while True:
                yield self.batch(index)
                index += 1

        shape = (self.batch_size, self.sequence_length)
        ids = tf.TensorSpec(shape, tf.int32)
        signature = (
            {"token_ids": ids, "padding_mask": ids, "segment_pos": ids},
            ids,
            tf.TensorSpec(shape, tf.float32),
        )
        return tf.data.Dataset.from_generator(batches, output_signature=signature)


def build_backbone(args, vocabulary_size):
    import keras_recurrentgemma

    pattern = ("recurrent", "recurrent", "attention")
    return keras_recurrentgemma.RecurrentGemmaBackbone(
        vocabulary_size=vocabulary_size,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim,
        num_heads=args.num_heads,
        block_types=[pattern[i % 3] for i in range(args.num_layers)],
        attention_window_size=args.attention_window_size,
        conv1d_temporal_width=4,
        logits_soft_cap=30.0,
        embeddings_scale_by_sqrt_dim=True,
    )


def compile_for_training(causal_lm, args):
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=args.learning_rate,
        warmup_steps=args.warmup_steps,
        decay_steps=args.steps - args.warmup_steps,
        alpha=0.1,  # ends at a tenth of the peak rate
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=args.weight_decay,
        beta_1=0.9,
        beta_2=0.95,
        global_clipnorm=1.0,
    )
    # No decay for norms, biases and the RG-LRU's decay parameter.
    optimizer.exclude_from_weight_decay(
        var_names=["^scale$", "^b$", "^bias$", "^a_param$"]
    )
    causal_lm.compile(
        optimizer=optimizer,
        # The mean over real targets (the default divides by all positions).
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        weighted_metrics=[],
    )
    return schedule


def make_logger(schedule, tokens_per_step, log_every, history):
    import keras

    class LossLogger(keras.callbacks.Callback):
        """One line per `log_every` steps: loss over them, rate, speed."""

        def on_train_begin(self, logs=None):
            self.start = self.last = time.time()

        def on_epoch_end(self, epoch, logs=None):
            now = time.time()
            step = (epoch + 1) * log_every
            loss = float(logs["loss"])
            rate = float(schedule(step))
            speed = tokens_per_step * log_every / (now - self.last)
            history.append(
                {"step": step, "loss": loss, "lr": rate, "elapsed_s": now - self.start}
            )
            print(
                f"step {step:6d}  loss {loss:.4f}  lr {rate:.2e}  "
                f"{speed:,.0f} tok/s  {(now - self.start) / 60:.1f} min",
                flush=True,
            )
            self.last = now

    return LossLogger()


# --- 5. Evaluation ------------------------------------------------------------


def held_out_windows(docs, sequence_length):
    """The held-out stream, packed like training, last window padded."""
    tokens = np.concatenate(docs)
    positions = np.concatenate([np.arange(len(d), dtype=np.int32) for d in docs])
    targets = len(tokens) - 1
    num = math.ceil(targets / sequence_length)
    size = num * sequence_length
    x = np.full(size, PAD, np.int32)
    y = np.full(size, PAD, np.int32)
    segment_pos = np.full(size, -1, np.int32)
    x[:targets] = tokens[:-1]
    y[:targets] = tokens[1:]
    segment_pos[:targets] = positions[:-1]
    mask = np.arange(size) < targets
    weight = mask & (y != BOS)
    shape = (num, sequence_length)
    return (
        x.reshape(shape),
        segment_pos.reshape(shape),
        mask.reshape(shape).astype(np.int32),
        y.reshape(shape),
        weight.reshape(shape),
    )


def evaluate(causal_lm, train_ids, held_ids, held_chars, vocab_size, args):
    """Held-out NLL of the model and of an add-one unigram, same targets."""
    x, segment_pos, mask, y, weight = held_out_windows(held_ids, args.sequence_length)
    model_nll = []
    for start in range(0, len(x), args.batch_size):
        part = slice(start, start + args.batch_size)
        logits = causal_lm.predict_on_batch(
            {
                "token_ids": x[part],
                "padding_mask": mask[part],
                "segment_pos": segment_pos[part],
            }
        )
        logits = np.asarray(logits, np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
        picked = np.take_along_axis(logits, y[part][..., None], axis=-1)[..., 0]
        model_nll.append((log_z - picked)[weight[part]])
    model_nll = np.concatenate(model_nll)

    # The unigram predicts the same targets: every training token but <bos>.
    counts = np.bincount(np.concatenate(train_ids), minlength=vocab_size)
    counts[BOS] = 0
    unigram_logp = np.log((counts + 1) / (counts.sum() + vocab_size))
    unigram_nll = -unigram_logp[y[weight]]

    def summary(nll):
        total = float(nll.sum())
        return {
            "nll_per_token": total / len(nll),
            "perplexity": math.exp(total / len(nll)),
            "bits_per_char": total / math.log(2) / held_chars,
        }

    return {
        "held_out_tokens": int(len(model_nll)),
        "held_out_chars": int(held_chars),
        "model": summary(model_nll),
        "unigram": summary(unigram_nll),
    }


def samples(causal_lm, seed, max_length=64):
    from keras_hub.samplers import TopKSampler

    out = {}
    for name, sampler in (("greedy", "greedy"), ("top_k_20", TopKSampler(20, seed))):
        causal_lm.compile(sampler=sampler)
        texts = causal_lm.generate(list(PROMPTS), max_length)
        out[name] = dict(zip(PROMPTS, texts, strict=True))
    causal_lm.compile(sampler="greedy")
    return out


# --- 6. Preset, model card, checks ----------------------------------------------

VERIFY_CODE = """
import json, keras, keras_recurrentgemma
lm = keras_recurrentgemma.RecurrentGemmaCausalLM.from_preset({path!r})
text = lm.generate("The function", max_length=40)
print("RESULT", json.dumps({{"backend": keras.config.backend(), "text": text}}))
"""


def verify_backends(path):
    """Loads the preset and generates in one fresh process per backend."""
    results = {}
    for backend in ("jax", "tensorflow", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run(
            [sys.executable, "-c", VERIFY_CODE.format(path=path)],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [s for s in done.stdout.splitlines() if s.startswith("RESULT ")]
        if done.returncode or not lines:
            raise RuntimeError(f"{backend}: loading {path} failed:\n{done.stderr}")
        results[backend] = json.loads(lines[-1][len("RESULT ") :])["text"]
        print(f"{backend}: {results[backend]!r}", flush=True)
    return results


def directory_size(path):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def du_sh(path):
    done = subprocess.run(["du", "-sh", path], capture_output=True, text=True)
    return done.stdout.split()[0] if done.returncode == 0 else "?"


def psf_license_text(corpus_root):
    """The PSF License Version 2 as the package's copyright file gives it."""
    path = os.path.join(corpus_root, COPYRIGHT_SUBDIR)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = text.find("BEOPEN.COM LICENSE AGREEMENT", start)
    if start < 0 or end < 0:
        return None
    return text[start:end].strip()


def fmt_samples(results):
    lines = []
    for kind, texts in results.items():
        lines.append(f"{kind}:\n")
        for prompt, text in texts.items():
            lines.append(f"- `{prompt}` → {json.dumps(text, ensure_ascii=False)}")
        lines.append("")
    return "\n".join(lines)


def write_model_card(out_dir, info, license_text):
    m, cfg, corpus, t = info["metrics"], info["config"], info["corpus"], info["train"]
    ours, base = m["model"], m["unigram"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    files = "\n".join(
        f"| `{name}` | {size:,} |" for name, size in sorted(info["files"].items())
    )
    backends = "\n".join(
        f"- {name}: {json.dumps(text, ensure_ascii=False)}"
        for name, text in info["backends"].items()
    )
    held = ", ".join(f"`{p}`" for p in corpus["held_out_files"])
    dropped = ", ".join(f"`{p}`" for p in corpus["files_dropped"]) or "none"
    license_block = (
        "\n".join(("    " + line).rstrip() for line in license_text.splitlines())
        if license_text
        else "    (the copyright file was not found in the corpus tree)"
    )
    signature = ", ".join(
        f"{k}={cfg[k]!r}"
        for k in (
            "vocabulary_size",
            "hidden_dim",
            "intermediate_dim",
            "num_heads",
            "lru_width",
            "attention_window_size",
            "conv1d_temporal_width",
            "logits_soft_cap",
        )
    )
    text = f"""# griffin_tiny_pydocs_en

A small Griffin (the RecurrentGemma architecture: RG-LRU recurrent blocks and
local multi-query attention) trained from scratch by this project on the English
prose of the Python 3.11 documentation, with its own SentencePiece vocabulary.
It writes technical English about Python. It ships so that the API can be tried
offline, on any backend, in seconds; it is not a useful language model.

```python
import keras_recurrentgemma

causal_lm = keras_recurrentgemma.RecurrentGemmaCausalLM.from_preset(
    "griffin_tiny_pydocs_en"  # or the path of this folder
)
causal_lm.generate("The function", max_length=40)
```

## Training data

**Source.** The reStructuredText sources of the Python 3.11 documentation
(`usr/share/doc/python3.11/html/_sources/**/*.rst.txt`) from Debian's package
`{DEB_PACKAGE}`, version `{info["deb_version"]}` (Debian 12): {corpus["files"]}
files, {corpus["raw_chars"]:,} characters.

**Cleaning** (in `tools/train_small_model.py`). Dropped: directives that hold
code, indexes, tables of contents or metadata; literal (`::`) and indented code
blocks; doctests; grid and simple tables; headings; field lists. Kept as prose:
the bodies of description directives (functions, classes, notes, version notes).
Roles become the text Sphinx shows (`:func:` → `os.path.join()`, `:class:` with
`~a.B` → `B`, `:ref:` → the section title, `:pep:` → `PEP 8`); literals and
hyperlinks become their text. A paragraph is kept if it has at least 8 tokens,
at least 75% of them plain words, a common English function word, and at least
98% ASCII characters. Files that are mostly list items (changelog dumps) are
dropped: {dropped}.

**Split.** By file, on a SHA-256 hash of the path. Held out, never seen by the
vocabulary or the model: {len(corpus["held_out_files"])} files,
{corpus["held_out_chars"]:,} characters ({held}). Training:
{corpus["train_files"]} files, {corpus["train_chars"]:,} characters,
{info["train_tokens"]:,} tokens.

### Licence of the training data

The Python documentation is licensed under the PSF License Agreement (Python
Software Foundation License Version 2). The package's copyright file
(`/usr/share/doc/python3.11-doc/copyright`) reproduces that licence, which
covers "this software ("Python") in source or binary form and its associated
documentation". The documentation's own licence page (`license.rst`) says
"Python software and documentation are licensed under the PSF License
Agreement", and that starting with Python 3.8.6, examples, recipes and other
code in the documentation are dual licensed under the PSF License Agreement and
the Zero-Clause BSD license. Its copyright page reads "Copyright © 2001-2023
Python Software Foundation. All rights reserved.", followed by the earlier
copyrights of BeOpen.com, CNRI and Stichting Mathematisch Centrum.

Summary of changes (clause 3 of the licence): the text was reduced to plain
prose as described above and used only to train this model's vocabulary and
weights. No documentation text ships here except the notices in this card. The
licence as the Debian copyright file gives it:

{license_block}

## How it was made

```
{info["command"]}
```

This ran on {info["platform"]} with the JAX backend (the script sets
`KERAS_BACKEND=jax`): {versions}. The cleaning, split, vocabulary (one thread),
data order and initialisation are all fixed by seed {info["seed"]}.

- **Vocabulary**: SentencePiece unigram, {cfg["vocabulary_size"]} pieces,
  `byte_fallback=True`, digits split. Ids `<pad>`=0, `<eos>`=1, `<bos>`=2,
  `<unk>`=3, then `<start_of_turn>` and `<end_of_turn>` (never trained on).
- **Model**: `RecurrentGemmaBackbone({signature})` with
  {len(cfg["block_types"])} blocks ({", ".join(cfg["block_types"])}), tied
  input and output embedding, float32.
- **Parameters**: {info["params"]:,}, of which {info["embedding_params"]:,} in
  the embedding.
- **Training**: `model.fit` on documents (`<bos>` ... `<eos>`) packed into
  windows of {t["sequence_length"]} tokens, with `segment_pos` restarting at
  each document. Batch {t["batch_size"]}, {t["steps"]:,} steps,
  {t["tokens_seen"]:,} tokens ({t["epochs"]:.1f} passes over the training
  text). AdamW with β = (0.9, 0.95), weight decay {t["weight_decay"]} (none on
  norms, biases and the RG-LRU `a`), global gradient-norm clip 1.0. Learning
  rate: linear warmup over {t["warmup_steps"]} steps to {t["learning_rate"]},
  then cosine decay to a tenth of that.
- **Time**: {t["wall_s"] / 60:.1f} minutes in `fit`, {info["total_wall_s"] / 60:.1f}
  minutes for the whole script, on a CPU shared with other work.
- **Final training loss** (mean over the last {t["log_every"]} steps):
  {t["final_loss"]:.3f} nats per token.

## Files

| file | bytes |
| --- | ---: |
{files}

Total {info["total_bytes"]:,} bytes without this card and `metrics.json`;
`du -sh` of the folder: {info["du"]}.

## Evaluation on the held-out files

The held-out documents are packed into {t["sequence_length"]}-token windows as
in training: {m["held_out_tokens"]:,} predicted tokens, {m["held_out_chars"]:,}
characters. The unigram baseline uses the training-token frequencies with
add-one smoothing over the same vocabulary, scored on the same tokens. Bits per
character do not depend on the vocabulary.

| | perplexity per token | bits per character |
| --- | ---: | ---: |
| this model | {ours["perplexity"]:.2f} | {ours["bits_per_char"]:.3f} |
| unigram baseline | {base["perplexity"]:.2f} | {base["bits_per_char"]:.3f} |

The numbers are also in `metrics.json`.

## Samples

Generated right after training with `max_length=64` (prompt included):

{fmt_samples(info["samples"])}
Loaded from this folder with `generate("The function", max_length=40)` (greedy)
on each backend:

{backends}

## Limits

- Tiny: {info["params"] / 1e6:.1f}M parameters trained for
  {t["wall_s"] / 60:.0f} minutes on a CPU. The text is grammatical in places,
  repetitive, and often wrong or meaningless.
- Technical English only, in the style of the Python documentation. It never
  saw code blocks, so it writes no real code. Characters outside the vocabulary
  fall back to bytes.
- Not instruction-tuned: `chat` and the turn tokens are there for API
  completeness only.
- Trained on windows of {t["sequence_length"]} tokens. Longer generation works
  (the attention is local, {cfg["attention_window_size"]} tokens, and the
  recurrence has a fixed-size state) but gains nothing from the extra context.
"""
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


# --- Main ---------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--corpus-dir",
        help="an extracted python3.11-doc tree (the folder holding usr/) or its "
        "_sources folder; if omitted, the pinned .deb is downloaded with apt-get",
    )
    data.add_argument(
        "--work-dir", default="/tmp/griffin_tiny_work", help="downloads, scratch"
    )
    data.add_argument("--held-out-percent", type=float, default=5.0)
    data.add_argument("--vocab-size", type=int, default=4096)
    model = parser.add_argument_group("model")
    model.add_argument("--hidden-dim", type=int, default=192)
    model.add_argument("--intermediate-dim", type=int, default=576)
    model.add_argument("--num-heads", type=int, default=4)
    model.add_argument("--num-layers", type=int, default=6)
    model.add_argument("--attention-window-size", type=int, default=128)
    train = parser.add_argument_group("training")
    train.add_argument("--sequence-length", type=int, default=256)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--log-every", type=int, default=100)
    train.add_argument("--seed", type=int, default=20240601)
    parser.add_argument(
        "--benchmark",
        type=int,
        metavar="STEPS",
        help="only time STEPS training steps (after a compile run) and exit",
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="preset folder")
    parser.add_argument(
        "--skip-backend-check",
        action="store_true",
        help="do not reload the preset on jax, tensorflow and torch",
    )
    parser.add_argument(
        "--rewrite-card",
        action="store_true",
        help="only rewrite README.md and metrics.json of the trained preset in "
        "--output from its metrics.json",
    )
    args = parser.parse_args(argv)
    if args.steps % args.log_every:
        parser.error("--steps must be a multiple of --log-every")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.rewrite_card:
        rewrite_card(args)
        return
    begin = time.time()
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        print("Training runs on JAX; ignoring KERAS_BACKEND.", flush=True)
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.makedirs(args.work_dir, exist_ok=True)

    # 1-2. Corpus.
    corpus_root = args.corpus_dir or fetch_corpus(args.work_dir)
    deb_version = package_version(corpus_root) or "unknown"
    print(f"corpus: {corpus_root} ({DEB_PACKAGE} {deb_version})", flush=True)
    train_docs, held_docs, report = build_corpus(
        sources_dir(corpus_root), args.held_out_percent
    )
    print(
        f"cleaned: {report['train_files']} training files "
        f"({report['train_chars']:,} chars), {len(held_docs)} held out "
        f"({report['held_out_chars']:,} chars); dropped {report['files_dropped']}",
        flush=True,
    )
    with open(os.path.join(args.work_dir, "corpus.json"), "w") as f:
        json.dump({"train": train_docs, "held_out": held_docs}, f)

    # 3. Vocabulary, on the training text only.
    import sentencepiece as spm

    proto = train_tokenizer(train_docs, args.vocab_size, args.seed)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    train_ids = encode_docs(processor, train_docs)
    held_ids = encode_docs(processor, held_docs)
    train_tokens = int(sum(len(d) for d in train_ids))
    print(
        f"vocabulary: {processor.get_piece_size()} pieces; {train_tokens:,} training "
        f"tokens ({report['train_chars'] / train_tokens:.2f} chars/token)",
        flush=True,
    )

    import jax
    import keras
    import keras_hub

    import keras_recurrentgemma

    tokenizer = keras_recurrentgemma.RecurrentGemmaTokenizer(proto=proto)
    # Our ids come from the sentencepiece library; the Keras tokenizer must agree.
    sample_text = held_docs[0][1][:2000]
    keras_ids = [int(i) for i in np.asarray(tokenizer(sample_text))]
    if keras_ids != processor.encode(sample_text):
        raise RuntimeError("RecurrentGemmaTokenizer and sentencepiece disagree.")

    # 4. Model and training.
    keras.utils.set_random_seed(args.seed)
    backbone = build_backbone(args, processor.get_piece_size())
    params = backbone.count_params()
    embedding_params = backbone.token_embedding.count_params()
    print(f"backbone: {params:,} parameters ({embedding_params:,} embedding)")
    trainer = keras_recurrentgemma.RecurrentGemmaCausalLM(backbone, preprocessor=None)
    schedule = compile_for_training(trainer, args)
    data = PackedWindows(train_ids, args.sequence_length, args.batch_size, args.seed)
    tokens_per_step = args.batch_size * args.sequence_length

    if args.benchmark:
        for label in ("compile + first steps", "steady state"):
            start = time.time()
            trainer.fit(
                data.dataset(), steps_per_epoch=args.benchmark, epochs=1, verbose=0
            )
            seconds = time.time() - start
            print(
                f"{label}: {args.benchmark} steps in {seconds:.1f} s, "
                f"{seconds / args.benchmark:.3f} s/step, "
                f"{tokens_per_step * args.benchmark / seconds:,.0f} tok/s",
                flush=True,
            )
        return

    history = []
    logger = make_logger(schedule, tokens_per_step, args.log_every, history)
    start = time.time()
    trainer.fit(
        data.dataset(),
        steps_per_epoch=args.log_every,
        epochs=args.steps // args.log_every,
        callbacks=[logger],
        verbose=0,
    )
    train_wall = time.time() - start
    print(f"training: {train_wall / 60:.1f} min", flush=True)

    # 5. Evaluation and samples.
    held_chars = sum(len(text) for _, text in held_docs)
    metrics = evaluate(
        trainer, train_ids, held_ids, held_chars, processor.get_piece_size(), args
    )
    print(json.dumps(metrics, indent=2), flush=True)
    preprocessor = keras_recurrentgemma.RecurrentGemmaCausalLMPreprocessor(
        tokenizer, sequence_length=args.sequence_length
    )
    causal_lm = keras_recurrentgemma.RecurrentGemmaCausalLM(backbone, preprocessor)
    generated = samples(causal_lm, args.seed)
    print(fmt_samples(generated), flush=True)

    # 6. Preset, checks, model card.
    out_dir = os.path.abspath(args.output)
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):  # a previous run's files
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                import shutil

                shutil.rmtree(path)
            else:
                os.remove(path)
    causal_lm.save_to_preset(out_dir)
    backends = {} if args.skip_backend_check else verify_backends(out_dir)

    final = [h["loss"] for h in history][-1]
    info = {
        "command": "python tools/train_small_model.py"
        + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""),
        "platform": f"{os.cpu_count()} CPU cores",
        "versions": {
            "keras": keras.__version__,
            "keras_hub": keras_hub.__version__,
            "jax": jax.__version__,
            "sentencepiece": spm.__version__,
        },
        "seed": args.seed,
        "deb_version": deb_version,
        "corpus": report,
        "train_tokens": train_tokens,
        "config": backbone.get_config(),
        "params": int(params),
        "embedding_params": int(embedding_params),
        "train": {
            "sequence_length": args.sequence_length,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "tokens_seen": args.steps * tokens_per_step,
            "epochs": args.steps * args.batch_size / data.windows_per_epoch,
            "warmup_steps": args.warmup_steps,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "log_every": args.log_every,
            "wall_s": train_wall,
            "final_loss": final,
            "history": history,
        },
        "metrics": metrics,
        "samples": generated,
        "backends": backends,
    }
    info["total_wall_s"] = time.time() - begin
    write_outputs(out_dir, info, psf_license_text(corpus_root))
    print(f"wrote {out_dir} ({info['du']}) in {info['total_wall_s'] / 60:.1f} min")


def write_outputs(out_dir, info, license_text):
    """README.md and metrics.json; `info` is everything the run measured."""
    info["files"] = {
        os.path.relpath(os.path.join(root, name), out_dir): os.path.getsize(
            os.path.join(root, name)
        )
        for root, _, names in os.walk(out_dir)
        for name in names
        if name not in ("README.md", "metrics.json")
    }
    info["total_bytes"] = sum(info["files"].values())
    for _ in range(2):  # the second pass reports the card's own size in du
        info["du"] = du_sh(out_dir)
        write_model_card(out_dir, info, license_text)
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, ensure_ascii=False)


def rewrite_card(args):
    """Rewrites README.md and metrics.json of a trained preset, no training.

    Older metrics.json files lack the corpus report; it is rebuilt (the
    cleaning is deterministic and takes seconds).
    """
    out_dir = os.path.abspath(args.output)
    with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
        info = json.load(f)
    corpus_root = args.corpus_dir or fetch_corpus(args.work_dir)
    if "corpus" not in info:
        _, _, info["corpus"] = build_corpus(
            sources_dir(corpus_root), args.held_out_percent
        )
        info.pop("held_out_files", None)
    write_outputs(out_dir, info, psf_license_text(corpus_root))
    print(f"rewrote {out_dir}/README.md and metrics.json ({info['du']})")


if __name__ == "__main__":
    main()
