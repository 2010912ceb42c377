"""Chat templates without running them per conversation, and in worker processes.

- ``TemplateTokenizer``: a tokenizer's Rust tokenizer and chat template rebuilt from plain data, for
  worker processes (checked against the real one on probe conversations by ``worker_tokenizer``);
- ``_ChatLayout``: a template rendered once per role sequence with placeholder contents, giving each
  assistant turn's span; ``_transparent``: whether a template copies contents verbatim and branches
  on none of them (checked on its syntax tree), so that a layout filled in equals the rendering.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Iterable

from steps.core.errors import ConfigError

log = logging.getLogger(__name__)


class TemplateTokenizer:
    """The two parts of a transformers tokenizer that chat encoding uses, rebuilt from plain
    data: its Rust tokenizer (``backend_tokenizer``, from its JSON) and its chat template
    rendered as ``apply_chat_template(..., tokenize=False)`` renders it. A worker process
    builds this in well under a second instead of importing transformers' tokenizer classes;
    ``worker_tokenizer`` checks it against the real tokenizer before any worker starts."""

    def __init__(self, backend: str, chat_template: str, template_kwargs: dict[str, Any]):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_str(backend)
        self.chat_template, self.template_kwargs = chat_template, template_kwargs

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        return self.template_kwargs

    def get_chat_template(self) -> str:
        return self.chat_template

    @classmethod
    def config_of(cls, tokenizer: Any) -> dict[str, Any]:
        return {"backend": tokenizer.backend_tokenizer.to_str(), "chat_template": tokenizer.get_chat_template(),
                "template_kwargs": dict(tokenizer.special_tokens_map)}

    def apply_chat_template(self, conversation: list, tokenize: bool = False, add_generation_prompt: bool = False
                            ) -> str | list[str]:
        if tokenize:
            raise ValueError("TemplateTokenizer renders text only")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        chats = [[{k: v for k, v in m.items() if v is not None} for m in chat]
                 for chat in (conversation if batched else [conversation])]
        plain = _plain_template(self.chat_template, frozenset(self.template_kwargs))
        if plain is not None:
            rendered = [plain.render(messages=chat, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.template_kwargs)
                        for chat in chats]
        else:
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(conversations=chats, chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt, **self.template_kwargs)
        return rendered if batched else rendered[0]

@functools.lru_cache(maxsize=16)
def _plain_template(template: str, token_names: frozenset[str]) -> Any:
    """A content-transparent template (``_template_is_transparent``) compiled in a sandboxed
    Jinja environment set up as transformers sets up its own (``trim_blocks``, ``lstrip_blocks``,
    loop controls, ``raise_exception``), or None. Such a template calls nothing but
    ``raise_exception`` and reads only messages' roles and contents, the loop and special tokens,
    so transformers' other globals and its message preprocessing cannot change its output; its
    ``tojson`` filter differs from Jinja's, so a template using it gets None. This spares a worker
    process the import of transformers (~1 s); ``worker_tokenizer`` still compares renderings with
    the real tokenizer's before any worker starts."""
    try:
        if not _cached_transparent(template, token_names):
            return None
        import jinja2
        from jinja2 import nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        if any(f.name == "tojson" for f in env.parse(template).find_all(nodes.Filter)):
            return None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(template)
    except Exception:  # noqa: BLE001 - rendered by transformers instead
        return None

# Conversations the worker tokenizer must render and encode exactly as the real one does.
_PROBES = [[{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello, 안녕하세요.\n"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " a\tb "},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more?"},
            {"role": "assistant", "content": "<no>"}]]

def worker_tokenizer(tokenizer: Any) -> dict[str, Any] | None:
    """``TemplateTokenizer.config_of(tokenizer)`` when the rebuilt tokenizer renders and encodes the
    probe conversations exactly as ``tokenizer`` does; None (no workers) otherwise."""
    try:
        config = TemplateTokenizer.config_of(tokenizer)
        rebuilt = TemplateTokenizer(**config)
        for chat in _PROBES:
            for cut in range(1, len(chat) + 1):
                for prompt in (False, True):
                    text = tokenizer.apply_chat_template(chat[:cut], tokenize=False, add_generation_prompt=prompt)
                    if rebuilt.apply_chat_template(chat[:cut], add_generation_prompt=prompt) != text:
                        return None
                    if rebuilt.backend_tokenizer.encode(text, add_special_tokens=False).ids != \
                            tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids:
                        return None
        return config
    except Exception:  # noqa: BLE001 - any difference means: encode in this process
        log.info("tokenize: the chat template cannot be rebuilt for worker processes; encoding here")
        return None

def _rendered_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """(start, end) of each assistant answer in ``text``, from renderings of the conversation's prefixes.
    Assistant turns that call tools (and the tool results) are context, not answers: not learned."""
    if any(m.get("tool_calls") for m in messages):
        check_renders_tool_calls(tokenizer)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("tool_calls"):
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False).rstrip("\n")
        spans.append(_span(prompt, turn, text))
    return spans

_TOOL_PROBE = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"type": "function", "function": {"name": "zq_probe_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "content": "18 C"}, {"role": "assistant", "content": "It is 18 C."}]


def check_renders_tool_calls(tokenizer: Any) -> None:
    """A ConfigError when the chat template drops tool calls (their records would train on a conversation
    that never called the tool)."""
    try:
        text = tokenizer.apply_chat_template(_TOOL_PROBE, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template that fails on tool messages: the same answer
        text = f"(error: {exc})"
    if "zq_probe_weather" not in text or "18 C" not in text:
        raise ConfigError("the records hold tool calls, but the base model's chat template does not render them; "
                          "set tokenize.chat_template to one that does (the built-in chatml does)")


def _span(prompt: str, turn: str, text: str) -> tuple[int, int]:
    if not (turn.startswith(prompt) and text.startswith(turn)):
        raise ConfigError("the chat template does not render conversation prefixes as prefixes; cannot mask prompts")
    return len(prompt), len(turn)

_MARK = re.compile("\ue000(\\d+)\ue001")  # a placeholder content: private-use characters around an index

class _ChatLayout:
    """A chat template rendered once for one sequence of roles, with placeholder contents: the
    full conversation, and per assistant turn its prompt (with generation header) and the
    turn itself, as literal pieces and content indices. Filling in a conversation's contents
    gives its prefixes without running the template again; ``spans`` uses that only when the
    filled-in full text equals the real rendering (else None: render the prefixes)."""

    def __init__(self, tokenizer: Any, roles: tuple[str, ...]):
        marked = [{"role": role, "content": f"\ue000{i}\ue001"} for i, role in enumerate(roles)]
        self.full = self._pieces(tokenizer.apply_chat_template(marked, tokenize=False))
        self.turns = [(self._pieces(tokenizer.apply_chat_template(marked[:i], tokenize=False,
                                                                  add_generation_prompt=True)),
                       self._pieces(tokenizer.apply_chat_template(marked[: i + 1], tokenize=False)))
                      for i, role in enumerate(roles) if role == "assistant"]
        # The fill equals real renderings of probe contents (spaces at the ends, markup, quotes,
        # newlines, Korean): the last guard before ``fill`` stands in for the template.
        self.verified = all(
            self.fill(contents) == tokenizer.apply_chat_template(
                [{"role": role, "content": c} for role, c in zip(roles, contents)], tokenize=False)
            for contents in ([f" <{i}> & 'x' \"y\"\n\n" for i in range(len(roles))],
                             [f"안녕 {{{{ {i} }}}}\t" for i in range(len(roles))]))

    def fill(self, contents: list[str]) -> str:
        """The full conversation's text with these contents."""
        return self._fill(self.full, contents)

    @staticmethod
    def applies(messages: list[dict[str, str]]) -> bool:
        """Only role and content, and no content holding the placeholder characters."""
        return all(m.keys() <= {"role", "content"} and isinstance(m.get("content"), str)
                   and "\ue000" not in m["content"] and "\ue001" not in m["content"] for m in messages)

    @staticmethod
    def _pieces(rendered: str) -> list[str | int]:
        parts = _MARK.split(rendered)
        return [int(part) if i % 2 else part for i, part in enumerate(parts)]

    @staticmethod
    def _fill(pieces: list[str | int], contents: list[str]) -> str:
        return "".join(contents[p] if isinstance(p, int) else p for p in pieces)

    def spans(self, text: str, contents: list[str]) -> list[tuple[int, int]] | None:
        if self._fill(self.full, contents) != text:
            return None
        return [_span(self._fill(prompt, contents), self._fill(turn, contents).rstrip("\n"), text)
                for prompt, turn in self.turns]

# The only names a content-transparent template may read, besides special tokens and the
# message loop variables: everything else could carry content somewhere (see ``_transparent``).
_SAFE_NAMES = {"messages", "loop", "add_generation_prompt", "raise_exception"}

_MESSAGE_KEYS = {"role", "content"}

def _transparent(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template copies each message's content verbatim into its
    output and lets nothing else depend on it: then the rendering of a conversation is its
    role sequence's layout with the contents filled in, whatever they hold.

    Checked on the template's syntax tree, by a whitelist (anything else: False, and every
    conversation is rendered): no assignments, macros, includes or calls (but
    ``raise_exception``); loops only over ``messages`` itself; a message read only as
    ``message['role']`` or ``message['content']`` (also ``messages[<int>][...]``),
    ``messages`` otherwise only looped over or measured (``| length``); and every
    content read sits in an output expression made only of ``+`` and ``~``, so no test,
    filter or comparison ever sees it. Names read must be those, the loop variables or
    special tokens. A Jinja template that breaks none of these cannot branch on a content."""
    try:
        return _cached_transparent(tokenizer.get_chat_template(), frozenset(tokenizer.special_tokens_map))
    except Exception:  # noqa: BLE001 - a template we cannot analyse is rendered per conversation
        return False

def _template_is_transparent(template: str, token_names: Iterable[str]) -> bool:
    import jinja2
    from jinja2 import nodes

    tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    parents: dict[int, nodes.Node] = {}
    for node in tree.find_all(nodes.Node):
        for child in node.iter_child_nodes():
            parents[id(child)] = node
    loop_vars = set()
    for loop in tree.find_all(nodes.For):
        if not (isinstance(loop.iter, nodes.Name) and loop.iter.name == "messages"
                and isinstance(loop.target, nodes.Name) and loop.recursive is False):
            return False
        loop_vars.add(loop.target.name)
    forbidden = (nodes.Assign, nodes.AssignBlock, nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.Include,
                 nodes.Import, nodes.FromImport, nodes.Scope, nodes.With, nodes.Block, nodes.Extends)
    if any(True for _ in tree.find_all(forbidden)):
        return False
    for call in tree.find_all(nodes.Call):
        if not (isinstance(call.node, nodes.Name) and call.node.name == "raise_exception"):
            return False
    allowed = _SAFE_NAMES | loop_vars | set(token_names)

    def key_of(node: nodes.Node) -> Any:
        if isinstance(node, nodes.Getattr):
            return node.attr
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            return node.arg.value
        return None

    for name in tree.find_all(nodes.Name):
        if name.ctx != "load":
            continue
        if name.name not in allowed:
            return False
        parent = parents.get(id(name))
        if name.name in loop_vars:
            if not (isinstance(parent, (nodes.Getitem, nodes.Getattr)) and parent.node is name
                    and key_of(parent) in _MESSAGE_KEYS):
                return False
        elif name.name == "messages":
            if isinstance(parent, nodes.For) and parent.iter is name:
                continue
            if isinstance(parent, nodes.Filter) and parent.name == "length" and parent.node is name:
                continue
            if not (isinstance(parent, nodes.Getitem) and parent.node is name and isinstance(key_of(parent), int)):
                return False
            grand = parents.get(id(parent))
            if not (isinstance(grand, (nodes.Getitem, nodes.Getattr)) and grand.node is parent
                    and key_of(grand) in _MESSAGE_KEYS):
                return False
    for node in tree.find_all((nodes.Getitem, nodes.Getattr, nodes.Const)):
        if isinstance(node, nodes.Const):
            if node.value == "content" and not isinstance(parents.get(id(node)), nodes.Getitem):
                return False  # "content" as a filter argument, a dict key, ...
            continue
        if key_of(node) != "content":
            continue
        child, parent = node, parents.get(id(node))
        while isinstance(parent, (nodes.Add, nodes.Concat)):
            child, parent = parent, parents.get(id(parent))
        if not isinstance(parent, nodes.Output):
            return False
    return True

_cached_transparent = functools.lru_cache(maxsize=16)(_template_is_transparent)  # one analysis per template
