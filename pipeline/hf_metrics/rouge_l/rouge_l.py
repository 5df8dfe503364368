"""ROUGE-L F-measure as an `evaluate` metric script that loads from this directory, offline.

`evaluate.load("rouge")` downloads its script from the Hub; `evaluate.load("<this directory>")`
does not. It wraps the same `rouge_score` package as the Hub script, with one change: the
tokenizer keeps Unicode letters (rouge_score's default keeps only a-z and 0-9, so a German reply
loses its umlauts and a Russian or Chinese reply becomes empty), and treats each Han or kana
character as a word, since those scripts do not separate words with spaces.
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")

_DESCRIPTION = "ROUGE-L (longest common subsequence) F-measure between predictions and references."
_CITATION = """@inproceedings{lin-2004-rouge,
  title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
  author = "Lin, Chin-Yew", booktitle = "Text Summarization Branches Out", year = "2004"}"""
_INPUTS = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
Returns:
    rougeL: mean F-measure; rougeL_per_item: the F-measure of each pair.
"""


class UnicodeWords:
    def tokenize(self, text):
        return _TOKEN.findall(text.lower())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWords())
        per_item = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rougeL": sum(per_item) / len(per_item) if per_item else 0.0, "rougeL_per_item": per_item}
