"""Utility scores: multiple-choice accuracy (ScienceQA-IMG) and VQA answer accuracy (VizWiz).

VQA accuracy is the official one of the VQA challenge (also used for VizWiz): the completion is normalized like the
official evaluation script normalizes answers, then, for each of the human answers left out in turn, it scores
min(#other humans who gave that answer / 3, 1); the score is the mean over the leave-one-out subsets. With 10
humans, 1 matching answer gives 0.3, 2 give 0.6, 3 give 0.9 and 4 or more give 1.0.

Example:
    >>> parse_choice("B. The magnet attracts.", 3), parse_choice("The answer is (C).", 3)
    ('B', 'C')
    >>> vqa_accuracy("Two", ["2"] * 2 + ["3"] * 8)
    0.6
"""

from __future__ import annotations

import re
from typing import Sequence

# The answer normalization of the official VQA evaluation script: GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit c4e6a0e4e84b9702d99800d3393652d92b5df224; `VQAEval.__init__`
# tables, `processPunctuation`, `processDigitArticle`, `evaluate`), BSD-licensed (c) 2014 Aishwarya Agrawal.
# Tables transcribed as published, quirks included: the capitalized keys ("Im", "Ive", "Id've") never match the
# lower-cased words, and "somebody'd" maps to "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_DIGITS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a look-ahead, so any "." not before a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: each mark is deleted when it touches a space somewhere in the text (or the
    text has a digit-comma-digit), else replaced by a space; then periods not before a digit are deleted.

    Example:
        >>> process_punctuation("black-and-white"), process_punctuation("yes, it is."), process_punctuation("1,000")
        ('black and white', 'yes it is', '1000')
    """
    out = text
    for mark in _PUNCT:
        if mark + " " in text or " " + mark in text or _COMMA_STRIP.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # sic: the script passes re.UNICODE (32) as the count


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, articles dropped, contractions mapped.

    Example:
        >>> process_digit_article("The Two dogs dont")
        "2 dogs don't"
    """
    words = [_DIGITS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def parse_choice(completion: str, n_choices: int) -> str | None:
    """The option letter a completion picks: a leading "B", "B." or "(B)", else "answer is B"; None if neither."""
    letters = "".join(chr(65 + i) for i in range(n_choices))
    text = completion.strip()
    match = re.match(rf"^\(?([{letters}])(?:[.):,\s]|$)", text) or re.search(
        rf"answer is:?\s*\(?([{letters}])\b", text, flags=re.IGNORECASE)
    return match.group(1).upper() if match else None


def normalize_answer(text: str) -> str:
    """A model answer as the official script normalizes it: newlines and tabs to spaces, stripped, punctuation, then
    digits, articles and contractions.

    Example:
        >>> normalize_answer("  The Red car. ")
        'red car'
    """
    return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(completion: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy: the mean, over each human answer left out in turn, of min(#matches among the others / 3,
    1). The completion is fully normalized; as in the official script, the human answers only go through
    `process_punctuation`, and only when they are not all the same.

    Example:
        >>> [vqa_accuracy("soup", ["soup"] * n + ["stew"] * (10 - n)) for n in range(6)]
        [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    guess = normalize_answer(completion)
    humans = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = sum(a == guess for a in humans)
    # Leaving out a matching answer leaves matches - 1 matches among the others; leaving out any other leaves matches.
    scores = [min((matches - (a == guess)) / 3, 1.0) for a in humans]
    return sum(scores) / len(scores)


def score_utility(completion: str, task: str, answers: Sequence[str], prompt: str = "") -> float:
    """Score one utility completion: for "multiple_choice", 1.0 if it picks answers[0] among the options listed in
    `prompt` ("A. ...", one per line); otherwise VQA accuracy.

    Example:
        >>> score_utility("B", "multiple_choice", ["B"], "Which?\\nA. cat\\nB. dog")
        1.0
        >>> score_utility("unanswerable", "short_answer", ["unanswerable"] * 2 + ["blurry"] * 8)
        0.6
    """
    if task == "multiple_choice":
        n_choices = len(re.findall(r"^[A-Z]\. ", prompt, flags=re.MULTILINE)) or 5
        return float(parse_choice(completion, n_choices) == answers[0])
    return vqa_accuracy(completion, answers)
