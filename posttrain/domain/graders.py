"""OpenAI's grader objects as typed configs: parse, store, template, combine.

A reinforcement job scores each sampled completion with a grader. The wire shapes are OpenAI's
(``GraderStringCheck``, ``GraderTextSimilarity``, ``GraderPython``, ``GraderScoreModel``,
``GraderMulti`` of its OpenAPI document, and the graders guide), so a client written for OpenAI's
reinforcement fine-tuning sends the same JSON here. This module only checks and holds them; the
trainer runs them (``posttrain.trainer.grading``), and the submit-time policy (python graders on a
keyed server, the judge model of ``score_model``) lives in ``posttrain.services.graders``.

Every refusal is a :class:`GraderInvalid` naming the offending field as a dotted ``param``
(``grader.graders.answer.operation``), which the API turns into a 400 with that param.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

STRING_CHECK_OPERATIONS = ("eq", "ne", "like", "ilike")
TEXT_SIMILARITY_METRICS = (
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor",
    "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)
# cosine compares embeddings of the two texts; this server serves no embedding model.
UNSUPPORTED_METRICS = {"cosine": "the cosine metric needs an embedding model, and this server serves none"}
MAX_PYTHON_SOURCE_BYTES = 256 * 1024  # OpenAI's limit on a python grader's source
MAX_FORMULA_CHARS = 1000
MAX_FORMULA_DEPTH = 64
MAX_TEMPLATE_CHARS = 100_000
MAX_SUB_GRADERS = 16


class GraderInvalid(ValueError):
    """A grader object that cannot be run; ``param`` names the field (dotted path) at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class TemplateError(ValueError):
    """A ``{{ ... }}`` reference that the sample or item at hand cannot fill."""


class FormulaError(ValueError):
    """A ``calculate_output`` that cannot be evaluated (division by zero, overflow, not finite)."""


@dataclass(frozen=True)
class StringCheckGrader:
    """Compares the rendered ``input`` with the rendered ``reference``: 1.0 when the check holds, else 0.0.

    eq / ne: case-sensitive equality / inequality; like: ``reference`` occurs in ``input``
    (case-sensitive); ilike: the same ignoring case.
    """

    name: str
    input: str
    reference: str
    operation: str
    type: str = field(default="string_check", init=False)


@dataclass(frozen=True)
class TextSimilarityGrader:
    """Scores how close the rendered ``input`` is to the rendered ``reference`` by ``evaluation_metric``.

    ``pass_threshold`` is kept for round trips and evals; the reward is the metric itself.
    """

    name: str
    input: str
    reference: str
    evaluation_metric: str
    pass_threshold: float | None = None
    type: str = field(default="text_similarity", init=False)


@dataclass(frozen=True)
class PythonGrader:
    """The user's ``grade(sample, item) -> float`` source, run in the trainer's sandbox."""

    name: str
    source: str
    image_tag: str | None = None
    pass_threshold: float | None = None
    type: str = field(default="python", init=False)


@dataclass(frozen=True)
class ScoreModelGrader:
    """A judge model asked to score the sample within ``range`` (the serving side must provide the judge)."""

    name: str
    model: str
    input: tuple[dict[str, Any], ...]
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: dict[str, Any] | None = None
    pass_threshold: float | None = None
    type: str = field(default="score_model", init=False)


@dataclass(frozen=True)
class MultiGrader:
    """Named sub-graders whose scores ``calculate_output`` combines, e.g. ``"0.5 * answer + 0.5 * style"``."""

    name: str
    graders: dict[str, SingleGrader]
    calculate_output: str
    type: str = field(default="multi", init=False)


SingleGrader = StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader
Grader = StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | MultiGrader

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")  # no braces inside: linear, whatever the text
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_NAMESPACES = ("sample", "item")


# ---------------------------------------------------------------- parsing

def parse_grader(obj: object, *, param: str = "grader") -> Grader:
    """Build the typed grader from OpenAI's JSON object, or raise :class:`GraderInvalid`."""
    return _parse(obj, param, allow_multi=True)


def _parse(obj: object, param: str, *, allow_multi: bool) -> Grader:
    if not isinstance(obj, dict):
        raise GraderInvalid("a grader must be a JSON object", param)
    kind = obj.get("type")
    if kind == "multi" and allow_multi:
        return _parse_multi(obj, param)
    parsers: dict[str, Callable[[dict[str, Any], str], Grader]] = {
        "string_check": _parse_string_check, "text_similarity": _parse_text_similarity,
        "python": _parse_python, "score_model": _parse_score_model,
    }
    if kind == "multi":
        raise GraderInvalid("a multi grader cannot hold another multi grader", f"{param}.type")
    if kind == "label_model":
        raise GraderInvalid("label_model graders are not supported (reinforcement needs a numeric score)",
                            f"{param}.type")
    parser = parsers.get(kind) if isinstance(kind, str) else None
    if parser is None:
        kinds = ", ".join([*parsers, "multi"] if allow_multi else parsers)
        raise GraderInvalid(f"unknown grader type {str(kind)[:60]!r}; one of: {kinds}", f"{param}.type")
    return parser(obj, param)


def _check_keys(obj: dict[str, Any], param: str, allowed: set[str]) -> None:
    for key in obj:
        if key not in allowed | {"type"}:
            raise GraderInvalid(f"unknown field {key[:60]!r} for a {obj['type']} grader", f"{param}.{key[:60]}")


def _text(obj: dict[str, Any], key: str, param: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise GraderInvalid(f"{key} must be a string", f"{param}.{key}")
    return value


def _name(obj: dict[str, Any], param: str) -> str:
    name = _text(obj, "name", param)
    if not name.strip() or len(name) > 200:
        raise GraderInvalid("name must be 1-200 characters", f"{param}.name")
    return name


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a JSON number that a float holds (a 400-digit integer is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _threshold(obj: dict[str, Any], param: str) -> float | None:
    value = obj.get("pass_threshold")
    if value is None:
        return None
    number = _finite(value)
    if number is None:
        raise GraderInvalid("pass_threshold must be a finite number", f"{param}.pass_threshold")
    return number


def _template(obj: dict[str, Any], key: str, param: str) -> str:
    text = _text(obj, key, param)
    if len(text) > MAX_TEMPLATE_CHARS:
        raise GraderInvalid(f"{key} is over {MAX_TEMPLATE_CHARS} characters", f"{param}.{key}")
    try:
        check_template(text)
    except TemplateError as error:
        raise GraderInvalid(str(error), f"{param}.{key}") from None
    return text


def _parse_string_check(obj: dict[str, Any], param: str) -> Grader:
    _check_keys(obj, param, {"name", "input", "reference", "operation"})
    operation = obj.get("operation")
    if operation not in STRING_CHECK_OPERATIONS:
        raise GraderInvalid(f"operation must be one of {', '.join(STRING_CHECK_OPERATIONS)}", f"{param}.operation")
    return StringCheckGrader(name=_name(obj, param), input=_template(obj, "input", param),
                             reference=_template(obj, "reference", param), operation=str(operation))


def _parse_text_similarity(obj: dict[str, Any], param: str) -> Grader:
    _check_keys(obj, param, {"name", "input", "reference", "evaluation_metric", "pass_threshold"})
    metric = obj.get("evaluation_metric")
    if metric not in TEXT_SIMILARITY_METRICS:
        raise GraderInvalid(f"evaluation_metric must be one of {', '.join(TEXT_SIMILARITY_METRICS)}",
                            f"{param}.evaluation_metric")
    if metric in UNSUPPORTED_METRICS:
        raise GraderInvalid(UNSUPPORTED_METRICS[str(metric)], f"{param}.evaluation_metric")
    return TextSimilarityGrader(name=_name(obj, param), input=_template(obj, "input", param),
                                reference=_template(obj, "reference", param), evaluation_metric=str(metric),
                                pass_threshold=_threshold(obj, param))


def _parse_python(obj: dict[str, Any], param: str) -> Grader:
    _check_keys(obj, param, {"name", "source", "image_tag", "pass_threshold"})
    source = _text(obj, "source", param)
    if len(source.encode()) > MAX_PYTHON_SOURCE_BYTES:
        raise GraderInvalid(f"source is over {MAX_PYTHON_SOURCE_BYTES} bytes", f"{param}.source")
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise GraderInvalid(f"source is not valid Python: {error.msg} (line {error.lineno})",
                            f"{param}.source") from None
    except (ValueError, RecursionError, MemoryError):  # null bytes; nesting too deep for the parser
        raise GraderInvalid("source is not valid Python (null bytes, or nested too deep to parse)",
                            f"{param}.source") from None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "grade" for node in tree.body):
        raise GraderInvalid("source must define grade(sample, item)", f"{param}.source")
    image_tag = obj.get("image_tag")
    if image_tag is not None and not isinstance(image_tag, str):
        raise GraderInvalid("image_tag must be a string", f"{param}.image_tag")
    return PythonGrader(name=_name(obj, param), source=source, image_tag=image_tag,
                        pass_threshold=_threshold(obj, param))


#: The roles a judge's messages may have (``developer`` is rendered as ``system``, as the chat doors do).
JUDGE_ROLES = ("system", "developer", "user", "assistant")
#: The content blocks a judge message may hold: text only (this server's judges read no images or audio).
JUDGE_TEXT_BLOCKS = ("input_text", "output_text", "text")
#: ``sampling_params`` this server honours for a judge, and the most tokens a judge may answer with.
JUDGE_SAMPLING_KEYS = ("temperature", "top_p", "seed", "max_completions_tokens")
MAX_JUDGE_TOKENS = 256
DEFAULT_JUDGE_TOKENS = 16


def _judge_message(message: object, param: str) -> None:
    if not isinstance(message, dict):
        raise GraderInvalid("each input message must be an object", param)
    for key in message:
        if key not in ("role", "content", "type"):
            raise GraderInvalid(f"unknown field {str(key)[:60]!r} for a judge message", f"{param}.{str(key)[:60]}")
    if message.get("type", "message") != "message":
        raise GraderInvalid("type must be 'message'", f"{param}.type")
    if message.get("role") not in JUDGE_ROLES:
        raise GraderInvalid(f"role must be one of {', '.join(JUDGE_ROLES)}", f"{param}.role")
    content = message.get("content")
    texts = [content] if isinstance(content, (str, dict)) else content
    if not isinstance(texts, list) or not texts:
        raise GraderInvalid("content must be a string or a list of text blocks", f"{param}.content")
    for index, block in enumerate(texts):
        where = f"{param}.content" if isinstance(content, str) else f"{param}.content[{index}]"
        if isinstance(block, dict):
            if block.get("type") not in JUDGE_TEXT_BLOCKS or set(block) != {"type", "text"}:
                raise GraderInvalid("a content block must be {\"type\": \"input_text\", \"text\": ...} "
                                    "(this server's judges read text only)", where)
            block = block["text"]
        if not isinstance(block, str):
            raise GraderInvalid("content must be a string or a list of text blocks", where)
        if len(block) > MAX_TEMPLATE_CHARS:
            raise GraderInvalid(f"content is over {MAX_TEMPLATE_CHARS} characters", where)
        try:
            check_template(block)
        except TemplateError as error:
            raise GraderInvalid(str(error), where) from None


def _judge_sampling(sampling: object, param: str) -> None:
    """What a judge's ``sampling_params`` may ask: honoured as the trainer generates, or refused here."""
    if not isinstance(sampling, dict):
        raise GraderInvalid("sampling_params must be an object", param)
    for key, value in sampling.items():
        where = f"{param}.{str(key)[:60]}"
        if key == "reasoning_effort":
            if value is not None:
                raise GraderInvalid("reasoning_effort is not supported: this server's judges answer directly, "
                                    "with no separate reasoning budget", where)
            continue
        if key not in JUDGE_SAMPLING_KEYS:
            raise GraderInvalid(f"unknown sampling parameter {str(key)[:60]!r}; this server honours "
                                f"{', '.join(JUDGE_SAMPLING_KEYS)}", where)
        if value is None:
            continue
        if key in ("seed", "max_completions_tokens"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise GraderInvalid(f"{key} must be an integer", where)
            if key == "max_completions_tokens" and not 1 <= value <= MAX_JUDGE_TOKENS:
                raise GraderInvalid(f"max_completions_tokens must be 1 to {MAX_JUDGE_TOKENS}", where)
            if key == "seed" and not 0 <= value < 2**63:
                raise GraderInvalid("seed must be a non-negative 64-bit integer", where)
            continue
        number = _finite(value)
        if key == "temperature" and (number is None or not 0 <= number <= 2):
            raise GraderInvalid("temperature must be a number from 0 to 2", where)
        if key == "top_p" and (number is None or not 0 < number <= 1):
            raise GraderInvalid("top_p must be a number above 0, at most 1", where)


def _parse_score_model(obj: dict[str, Any], param: str) -> Grader:
    _check_keys(obj, param, {"name", "model", "input", "range", "sampling_params", "pass_threshold"})
    model = _text(obj, "model", param)
    if not model.strip() or len(model) > 1000:
        raise GraderInvalid("model must name the judge model", f"{param}.model")
    messages = obj.get("input")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise GraderInvalid("input must be a non-empty list of message objects", f"{param}.input")
    for index, message in enumerate(messages):
        _judge_message(message, f"{param}.input[{index}]")
    bounds = obj.get("range", [0, 1])
    low, high = [_finite(b) for b in bounds] if isinstance(bounds, list) and len(bounds) == 2 else [None, None]
    if low is None or high is None or not low < high:
        raise GraderInvalid("range must be [low, high], two finite numbers with low < high", f"{param}.range")
    sampling = obj.get("sampling_params")
    if sampling is not None:
        _judge_sampling(sampling, f"{param}.sampling_params")
    return ScoreModelGrader(name=_name(obj, param), model=model, input=tuple(messages),
                            range=(low, high), sampling_params=sampling,
                            pass_threshold=_threshold(obj, param))


def _parse_multi(obj: dict[str, Any], param: str) -> Grader:
    _check_keys(obj, param, {"name", "graders", "calculate_output"})
    raw = obj.get("graders")
    # The guide's shape is an object of name -> grader; a list is accepted too, each named by its "name".
    if isinstance(raw, list):
        pairs = [(item.get("name") if isinstance(item, dict) else None, item, f"{param}.graders[{i}]")
                 for i, item in enumerate(raw)]
    elif isinstance(raw, dict):
        pairs = [(key, item, f"{param}.graders.{str(key)[:60]}") for key, item in raw.items()]
    else:
        raise GraderInvalid("graders must be an object of name -> grader", f"{param}.graders")
    if not pairs or len(pairs) > MAX_SUB_GRADERS:
        raise GraderInvalid(f"graders must hold 1-{MAX_SUB_GRADERS} graders", f"{param}.graders")
    graders: dict[str, SingleGrader] = {}
    for key, item, where in pairs:
        if not isinstance(key, str) or not _IDENTIFIER.match(key) or key in _FUNCTIONS:
            raise GraderInvalid(f"sub-grader name {str(key)[:60]!r} must be an identifier (letters, digits, _) usable in "
                                "calculate_output, and not a function name", where)
        if key in graders:
            raise GraderInvalid(f"two sub-graders are named {key!r}", where)
        sub = _parse(item, where, allow_multi=False)
        assert not isinstance(sub, MultiGrader)
        graders[key] = sub
    formula = _text(obj, "calculate_output", param)
    try:
        check_formula(formula, set(graders))
    except FormulaError as error:
        raise GraderInvalid(str(error), f"{param}.calculate_output") from None
    return MultiGrader(name=_name(obj, param), graders=graders, calculate_output=formula)


# ---------------------------------------------------------------- round trip

def grader_to_json(grader: Grader) -> dict[str, Any]:
    """OpenAI's JSON object of ``grader``: ``parse_grader(grader_to_json(g)) == g``."""
    if isinstance(grader, MultiGrader):
        return {"type": "multi", "name": grader.name, "calculate_output": grader.calculate_output,
                "graders": {key: grader_to_json(sub) for key, sub in grader.graders.items()}}
    out: dict[str, Any] = {"type": grader.type, "name": grader.name}
    if isinstance(grader, StringCheckGrader):
        out.update(input=grader.input, reference=grader.reference, operation=grader.operation)
    elif isinstance(grader, TextSimilarityGrader):
        out.update(input=grader.input, reference=grader.reference, evaluation_metric=grader.evaluation_metric)
    elif isinstance(grader, PythonGrader):
        out["source"] = grader.source
        if grader.image_tag is not None:
            out["image_tag"] = grader.image_tag
    else:
        out.update(model=grader.model, input=list(grader.input), range=list(grader.range))
        if grader.sampling_params is not None:
            out["sampling_params"] = grader.sampling_params
    if not isinstance(grader, StringCheckGrader) and grader.pass_threshold is not None:
        out["pass_threshold"] = grader.pass_threshold
    return out


def grader_kinds(grader: Grader) -> set[str]:
    """The grader types ``grader`` uses, sub-graders included (what the submit-time policy looks at)."""
    if isinstance(grader, MultiGrader):
        return {"multi"} | {sub.type for sub in grader.graders.values()}
    return {grader.type}


# ---------------------------------------------------------------- templating

def make_sample(output_text: str) -> dict[str, Any]:
    """The ``sample`` namespace of one completion: ``output_text``, and ``output_json`` when the text is
    a JSON object (as OpenAI fills it), so ``{{sample.output_json.answer}}`` and python graders can use it."""
    sample: dict[str, Any] = {"output_text": output_text}
    try:
        parsed = json.loads(output_text)
    except (ValueError, RecursionError):
        return sample
    if isinstance(parsed, dict):
        sample["output_json"] = parsed
    return sample


def _split_reference(inner: str) -> tuple[str, list[str | int]]:
    text = inner.strip()
    namespace, dot, rest = text.partition(".")
    if namespace not in _NAMESPACES or not dot or not rest:
        raise TemplateError(f"{{{{{inner}}}}}: a template must be {{{{sample.<field>}}}} or {{{{item.<field>}}}}")
    parts: list[str | int] = []
    position = 0
    for match in _PATH_PART.finditer(rest):
        if match.start() != position and rest[position:match.start()] != ".":
            raise TemplateError(f"{{{{{inner}}}}}: cannot read the field path {rest!r}")
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        position = match.end()
    if position != len(rest) or not parts:
        raise TemplateError(f"{{{{{inner}}}}}: cannot read the field path {rest!r}")
    return namespace, parts


def check_template(template: str) -> None:
    """Raise :class:`TemplateError` if a ``{{ ... }}`` in ``template`` is not a sample/item reference."""
    for match in _TEMPLATE.finditer(template):
        _split_reference(match.group(1))


def render_template(template: str, sample: Mapping[str, Any], item: Mapping[str, Any]) -> str:
    """Fill each ``{{sample.x}}`` / ``{{item.a.b[0]}}`` (a digit part indexes a list); strings as they are,
    other values as JSON. A missing field raises :class:`TemplateError` naming it."""
    def fill(match: re.Match[str]) -> str:
        namespace, parts = _split_reference(match.group(1))
        value: Any = sample if namespace == "sample" else item
        walked = namespace
        for part in parts:
            if isinstance(value, Mapping) and str(part) in value:
                value = value[str(part)]
            elif isinstance(value, list) and isinstance(part, int) and part < len(value):
                value = value[part]
            elif isinstance(value, list) and isinstance(part, str) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise TemplateError(f"{{{{{match.group(1).strip()}}}}}: {walked} has no field {str(part)!r}")
            walked = f"{walked}.{part}"
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return _TEMPLATE.sub(fill, template)


def _message_text(content: str | dict[str, Any] | list[Any]) -> str:
    blocks = [content] if isinstance(content, (str, dict)) else content
    return "".join(b if isinstance(b, str) else str(b["text"]) for b in blocks)


def judge_messages(grader: ScoreModelGrader, sample: Mapping[str, Any],
                   item: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat a ``score_model`` judge reads for one sample: each input message's text (its blocks
    joined) with ``{{sample.*}}``/``{{item.*}}`` filled; ``developer`` becomes ``system``, as the chat
    doors render it. :class:`TemplateError` for a field the item lacks."""
    chat = []
    for message in grader.input:
        role = "system" if message["role"] == "developer" else str(message["role"])
        chat.append({"role": role, "content": render_template(_message_text(message["content"]), sample, item)})
    return chat


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def judge_score(answer: str, bounds: tuple[float, float]) -> float | None:
    """The judge's score read from its answer: the first number in it, clamped to ``bounds`` (the
    grader's ``range``) and mapped linearly onto [0, 1], the scale every grader's reward has (OpenAI's
    guide: a grade from 0 to 1). None when the answer holds no (finite) number."""
    low, high = bounds
    for match in _NUMBER.finditer(answer):
        try:
            value = float(match.group(0))
        except (ValueError, OverflowError):
            continue
        if math.isfinite(value):
            return (min(max(value, low), high) - low) / (high - low)
    return None


# ---------------------------------------------------------------- calculate_output

def _floor(x: float) -> float:
    return float(math.floor(x))


def _ceil(x: float) -> float:
    return float(math.ceil(x))


# The functions OpenAI's guide lists for calculate_output, with their arity.
_FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {
    "min": (min, None), "max": (max, None), "abs": (abs, 1), "floor": (_floor, 1), "ceil": (_ceil, 1),
    "exp": (math.exp, 1), "sqrt": (math.sqrt, 1), "log": (math.log, 1),
}
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: float(a ** b),
}


def _formula_tree(formula: str) -> ast.expr:
    if len(formula) > MAX_FORMULA_CHARS:
        raise FormulaError(f"calculate_output is over {MAX_FORMULA_CHARS} characters")
    # OpenAI writes powers as ^; Python's ^ is xor, so it is read as ** (same precedence as a power).
    try:
        tree = ast.parse(formula.replace("^", "**"), mode="eval").body
    except (SyntaxError, RecursionError, MemoryError):
        raise FormulaError(f"calculate_output is not an arithmetic expression: {formula!r}") from None
    # The checks and the evaluation recurse over the tree: bound its depth before they walk it.
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_FORMULA_DEPTH:
            raise FormulaError(f"calculate_output nests deeper than {MAX_FORMULA_DEPTH} levels")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return tree


def _check_node(node: ast.expr, names: set[str]) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise FormulaError(f"calculate_output allows only numbers, not {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id not in names:
            raise FormulaError(f"calculate_output names {node.id!r}, which is not one of the graders "
                               f"({', '.join(sorted(names))})")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise FormulaError(f"calculate_output allows + - * / ^ only, not {type(node.op).__name__}")
        _check_node(node.left, names)
        _check_node(node.right, names)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.UAdd, ast.USub)):
            raise FormulaError(f"calculate_output does not allow {type(node.op).__name__}")
        _check_node(node.operand, names)
    elif isinstance(node, ast.Call):
        function = node.func.id if isinstance(node.func, ast.Name) else None
        if function not in _FUNCTIONS or node.keywords:
            raise FormulaError(f"calculate_output may call only {', '.join(_FUNCTIONS)} (positional arguments)")
        arity = _FUNCTIONS[function][1]
        if (arity is not None and len(node.args) != arity) or (arity is None and not node.args):
            raise FormulaError(f"{function}() takes {arity or 'one or more'} argument(s)")
        for argument in node.args:
            if isinstance(argument, ast.Starred):
                raise FormulaError("calculate_output does not allow *arguments")
            _check_node(argument, names)
    else:
        raise FormulaError(f"calculate_output does not allow {type(node).__name__} "
                           "(numbers, grader names, + - * / ^, parentheses and min max abs floor ceil exp sqrt log)")


def check_formula(formula: str, names: set[str]) -> None:
    """Raise :class:`FormulaError` unless ``formula`` is arithmetic over ``names`` within the whitelist."""
    _check_node(_formula_tree(formula), names)


def _evaluate(node: ast.expr, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, (int, float))
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return float(_FUNCTIONS[node.func.id][0](*[_evaluate(a, values) for a in node.args]))


def evaluate_formula(formula: str, values: Mapping[str, float]) -> float:
    """The value of ``calculate_output`` given each sub-grader's score, walked over the checked AST
    (never ``eval``). Raises :class:`FormulaError` on a bad formula, a math error or a non-finite result."""
    tree = _formula_tree(formula)
    _check_node(tree, set(values))
    try:
        result = _evaluate(tree, values)
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as error:
        raise FormulaError(f"calculate_output failed: {type(error).__name__}: {error}") from None
    if not math.isfinite(result):
        raise FormulaError(f"calculate_output gave {result}, not a finite number")
    return result
