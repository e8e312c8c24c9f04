"""Exit codes the documentation promises agree with `errors.EXIT_*` (issue 27, item 8).

Every "exit N" / "exits N" / "exit code N" in the user-facing documents must be a code nnpatch
has, and a claim about a failure with a fixed code (no patch leads from this version, interrupted,
the user's code failed, ...), named in the words just before it, must give that code."""

from __future__ import annotations

import glob
import os
import re

import pytest

from nnpatch import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted({os.path.relpath(p, ROOT) for pattern in ("README.md", "SECURITY.md", "docs/*.md", "spec/*.md")
               for p in glob.glob(os.path.join(ROOT, pattern))})
CODES = {v for k, v in vars(errors).items() if k.startswith("EXIT_")} | {128 + 15}  # 143: SIGTERM
CLAIM = re.compile(r"\bexit(?:s| code| status)?\s+(\d+)\b", re.I)

#: phrases that name one failure, and the one code it has
FIXED = [
    (re.compile(r"\bno patch (?:leads|for this model)", re.I), errors.EXIT_NO_PATCH),
    (re.compile(r"\bfull download is needed", re.I), errors.EXIT_NO_PATCH),
    (re.compile(r"\bUserCodeError\b"), errors.EXIT_USER_CODE),
    (re.compile(r"\bSIGTERM\b"), 143),
    (re.compile(r"\b(?:Ctrl-C|SIGINT)\b"), errors.EXIT_INTERRUPTED),
]


#: where the failure a claim is about starts: a sentence, a list item, a table cell or an earlier claim
BOUNDARY = re.compile(r"\.\s|;\s|\n\s*[-*]\s|\n\s*\n|\||\bexit(?:s| code| status)?\s+\d+\b", re.I)


def _claims():
    """(document, the text the claim is about, the code it claims) for every claim."""
    for rel in DOCS:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        for m in CLAIM.finditer(text):
            before = text[max(0, m.start() - 300):m.start()]
            cuts = [b.end() for b in BOUNDARY.finditer(before)]
            yield rel, " ".join(before[cuts[-1] if cuts else 0:].split()), int(m.group(1))


def test_the_documents_make_claims():
    assert len(list(_claims())) >= 20  # the check below would pass vacuously on a moved doc tree


@pytest.mark.parametrize("rel", DOCS)
def test_every_claimed_code_exists(rel):
    for doc, about, code in _claims():
        if doc == rel:
            assert code in CODES, (doc, code, about)


def test_fixed_failures_give_their_code():
    wrong = []
    for doc, about, claimed in _claims():
        for phrase, code in FIXED:
            if phrase.search(about) and claimed != code:
                wrong.append((doc, claimed, code, about[-160:]))
    assert not wrong, wrong
