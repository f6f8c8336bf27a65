"""nextword.v1.NextWord: validate, convert protobuf <-> engine objects, map errors to status codes."""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from service.api.config import ServerConfig
from service.api.parse import MalformedRequest
from service.api.users import USER_KEY
from service.history.histories import SERVED_FOR_HISTORY, Histories, NextTokens, SessionLearner, units
from service.model import current_call
from service.model.engine import Engine, by_name
from service.model.generation import END_TOKEN, LENGTH, STOP_STRING, GenerationParams
from service.model.pinyin import Candidate, PinyinError
from service.model.suggest import SuggestResult
from service.model.typing_session import EditError, TypingSession
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

DEFAULT_SUGGESTIONS = 3
DEFAULT_CANDIDATES = 9
DEFAULT_MAX_TOKENS = 64
MAX_TEMPERATURE = 10.0
MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 64
EDIT_QUEUE = 64  # Type edits read ahead of the session
EXPORT_LINES = 500  # history lines per ExportHistory message
READER_POLL = 0.25  # seconds between a blocked Type reader's checks that its call is still on
FINISH_REASONS = {
    LENGTH: pb.FINISH_REASON_LENGTH,
    END_TOKEN: pb.FINISH_REASON_END_TOKEN,
    STOP_STRING: pb.FINISH_REASON_STOP_STRING,
}


class Invalid(ValueError):
    """A request outside the limits: INVALID_ARGUMENT with this message."""


def to_response(result: SuggestResult) -> pb.SuggestResponse:
    return pb.SuggestResponse(
        suggestions=[pb.Suggestion(text=text, probability=p) for text, p in result.suggestions],
        completes_word=result.completes_word,
        prefix=result.prefix,
    )


def to_candidates(candidates: list[Candidate]) -> list[pb.Candidate]:
    return [
        pb.Candidate(text=c.text, consumed=c.consumed, syllables=" ".join(c.syllables), probability=c.probability)
        for c in candidates
    ]


def apply_edit(session: TypingSession, request: pb.TypeRequest, index: int) -> None:
    """One Type edit; ``index`` (from 1) names it in errors."""
    kind = request.WhichOneof("edit")
    if kind == "compose":
        if not request.compose:
            raise Invalid(f"edit {index}: compose must not be empty")
        session.compose(request.compose)
    elif kind == "select":
        session.select(request.select)
    elif kind == "append":
        if not request.append:
            raise Invalid(f"edit {index}: append must not be empty")
        session.append(request.append)
    elif kind == "delete":
        if request.delete < 1:
            raise Invalid(f"edit {index}: delete must be at least 1")
        session.delete(request.delete)
    elif kind == "reset":
        session.reset()
    elif kind is None and not request.num_suggestions:
        raise Invalid(f"edit {index}: give append, delete, reset, commit, compose or select")


class NextWordServicer(pb_grpc.NextWordServicer):
    def __init__(
        self, engines: Engine | dict[str, Engine], config: ServerConfig, histories: Histories | None = None
    ) -> None:
        """``engines``: the served models by name, the first answering requests that name none."""
        self.engines = by_name(engines)
        self.engine = next(iter(self.engines.values()))
        self.config = config
        self.histories = histories  # personal histories (service/history/histories.py); None: off
        self._next_tokens: dict[str, NextTokens] = {}  # by model, built at the first Generate that names a user
        self._sessions = threading.BoundedSemaphore(config.max_sessions)
        self._active_sessions = 0
        self._active_generations = 0
        self._lock = threading.Lock()
        self._model_info = {name: self._describe(name, engine) for name, engine in self.engines.items()}

    @property
    def active_sessions(self) -> int:
        return self._active_sessions

    @property
    def active_generations(self) -> int:
        return self._active_generations

    # ------------------------------------------------------------------ validation

    def _engine(self, name: str, context) -> Engine:
        """The model a request names (empty: the first); NOT_FOUND naming those that exist."""
        engine = self.engines.get(name) if name else self.engine
        if engine is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no model named {name[:64]!r}; this server has {', '.join(repr(n) for n in self.engines)}",
            )
        current_call.set_model(engine.name)
        return engine

    def _text(self, text: str, field: str, required: bool = True) -> str:
        if required and not text:
            raise Invalid(f"{field} must not be empty")
        if len(text) > self.config.max_text_chars:
            raise Invalid(f"{field} has {len(text)} characters; the limit is {self.config.max_text_chars}")
        return text

    def _num_suggestions(self, value: int, default: int, field: str = "num_suggestions") -> int:
        if value > self.config.max_suggestions:
            raise Invalid(
                f"{field} is {value}; it must be 0 (meaning {default}) to {self.config.max_suggestions} "
                "(server setting max_suggestions)"
            )
        return value or default

    def _params(self, request: pb.GenerateRequest) -> GenerationParams:
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise Invalid(f"temperature is {temperature}; it must be from 0 to {MAX_TEMPERATURE:g} (0 is greedy)")
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
            raise Invalid(f"top_p is {top_p}; it must be in (0, 1]")
        if request.max_tokens > self.config.max_generate_tokens:
            raise Invalid(f"max_tokens is {request.max_tokens}; the limit is {self.config.max_generate_tokens}")
        if len(request.stop) > MAX_STOP_STRINGS:
            raise Invalid(f"{len(request.stop)} stop strings; the limit is {MAX_STOP_STRINGS}")
        for stop in request.stop:
            if not 1 <= len(stop) <= MAX_STOP_CHARS:
                raise Invalid(f"a stop string has {len(stop)} characters; each must have 1 to {MAX_STOP_CHARS}")
        return GenerationParams(
            temperature=temperature,
            top_k=request.top_k,
            top_p=top_p,
            max_tokens=request.max_tokens or min(DEFAULT_MAX_TOKENS, self.config.max_generate_tokens),
            stop=tuple(request.stop),
            seed=request.seed if request.HasField("seed") else None,
        )

    # ------------------------------------------------------------------ personal history

    def _personal(
        self, engine: Engine, suggest: Callable[[int], SuggestResult], text: str, count: int
    ) -> SuggestResult:
        """``suggest(count)``, mixed with the history of the call's user when it names one (the history is mixed
        with the first ``SERVED_FOR_HISTORY`` suggestions, service/history/histories.py)."""
        user = current_call.user()
        if user is None or self.histories is None or not text or not len(self.histories.user(user)):
            return suggest(count)
        result = suggest(max(count, SERVED_FOR_HISTORY))
        split = engine.suggester.split(text)
        mixed = self.histories.suggest(user, split.context, split.prefix, result.suggestions, count, engine.lacks)
        return SuggestResult(mixed, result.completes_word, result.prefix)

    def _personal_candidates(self, context: str, candidates: list[Candidate]) -> list[Candidate]:
        """Conversions re-ranked with the call's user's history, when it names one."""
        user = current_call.user()
        if user is None or self.histories is None or not candidates:
            return candidates
        return self.histories.rerank_conversions(user, context, candidates)

    def _next_token_mix(self, engine: Engine):
        """For Generate: the next-token distribution mixed with the call's user's history, or None."""
        user = current_call.user()
        if user is None or self.histories is None:
            return None
        tokens = self._next_tokens.get(engine.name)
        if tokens is None:
            tokens = self._next_tokens[engine.name] = NextTokens(engine.artifact.tokenizer)
        return lambda text, log_probs: self.histories.mix_next_token(user, tokens, text, log_probs)

    def _history_user(self, context, writes: bool) -> str:
        """The call's user, for the history RPCs; aborts when there is none or the history is off."""
        if self.histories is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "personal history is off on this server (--history-db off)"
            )
        if writes and not self.histories.learning:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "learning is off on this server (--no-learning)")
        user = current_call.user()
        if user is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"this call needs metadata {USER_KEY} naming its user")
        return user

    # ------------------------------------------------------------------ RPCs

    def Suggest(self, request: pb.SuggestRequest, context: grpc.ServicerContext) -> pb.SuggestResponse:
        engine = self._engine(request.model, context)
        try:
            text = self._text(request.text, "text")
            count = self._num_suggestions(request.num_suggestions, DEFAULT_SUGGESTIONS)
        except Invalid as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return to_response(self._personal(engine, functools.partial(engine.suggester.suggest, text), text, count))

    def Convert(self, request: pb.ConvertRequest, context: grpc.ServicerContext) -> pb.ConvertResponse:
        engine = self._engine(request.model, context)
        if engine.converter is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {engine.name!r} does not read Chinese, so it cannot convert pinyin "
                "(GetModelInfoResponse.pinyin says which models can)",
            )
        try:
            text = self._text(request.context, "context", required=False)
            if len(request.pinyin) > self.config.max_pinyin_letters:
                raise Invalid(
                    f"pinyin has {len(request.pinyin)} letters; the limit is {self.config.max_pinyin_letters} "
                    "(server setting max_pinyin_letters)"
                )
            count = self._num_suggestions(request.num_candidates, DEFAULT_CANDIDATES, "num_candidates")
            candidates = engine.converter.convert(text, request.pinyin, count, request.fuzzy)
        except (Invalid, PinyinError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.ConvertResponse(candidates=to_candidates(self._personal_candidates(text, candidates)))

    def Learn(self, request: pb.LearnRequest, context) -> pb.LearnResponse:
        user = self._history_user(context, writes=True)
        try:
            text = self._text(request.text, "text")
        except Invalid as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.LearnResponse(ngrams=self.histories.learn(user, units(text)))

    def Forget(self, request: pb.ForgetRequest, context) -> pb.ForgetResponse:
        user = self._history_user(context, writes=False)
        if len(request.word) > self.config.max_text_chars:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"word has more than {self.config.max_text_chars} characters"
            )
        return pb.ForgetResponse(removed=self.histories.forget(user, request.word.strip()))

    def ExportHistory(self, request, context) -> Iterator[pb.HistoryChunk]:
        user = self._history_user(context, writes=False)
        lines = []
        for line in self.histories.export(user):
            lines.append(line + "\n")
            if len(lines) == EXPORT_LINES:
                yield pb.HistoryChunk(lines="".join(lines))
                lines = []
        if lines:
            yield pb.HistoryChunk(lines="".join(lines))

    def ImportHistory(self, request_iterator, context) -> pb.ImportHistoryResponse:
        user = self._history_user(context, writes=True)
        limit = 10 * self.config.history_max_entries
        lines: list[str] = []
        for chunk in request_iterator:
            lines.extend(chunk.lines.splitlines())
            if len(lines) > limit:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"more than {limit} history lines (10 x history_max_entries); import them in parts",
                )
        try:
            return pb.ImportHistoryResponse(ngrams=self.histories.import_lines(user, lines))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ImportHistory: {error}")

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        engine = self._engine(request.model, context)
        try:
            prompt = self._text(request.prompt, "prompt")
            params = self._params(request)
        except Invalid as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        with self._lock:
            self._active_generations += 1
        try:
            events = engine.generator.generate(
                prompt, params, cancelled=lambda: not context.is_active(), adjust=self._next_token_mix(engine)
            )
            for event in events:
                if event.finish_reason is None:
                    yield pb.GenerateResponse(text=event.text)
                elif event.finish_reason in FINISH_REASONS:
                    yield pb.GenerateResponse(
                        finished=pb.GenerateFinished(
                            reason=FINISH_REASONS[event.finish_reason],
                            prompt_tokens=event.prompt_tokens,
                            generated_tokens=event.generated_tokens,
                        )
                    )
                # cancelled: the client is gone (cancel or deadline), nothing to send
        finally:
            with self._lock:
                self._active_generations -= 1

    def Type(self, request_iterator, context: grpc.ServicerContext) -> Iterator[pb.TypeResponse]:
        if not self._sessions.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many typing sessions: the limit is {self.config.max_sessions} at once",
            )
        with self._lock:
            self._active_sessions += 1
        try:
            yield from self._type(request_iterator, context)
        finally:
            with self._lock:
                self._active_sessions -= 1
            self._sessions.release()

    def _type(self, request_iterator, context) -> Iterator[pb.TypeResponse]:
        edits: queue.Queue = queue.Queue(maxsize=EDIT_QUEUE)
        ended = threading.Event()  # the call is over: the reader stops too
        done = object()

        def offer(item) -> bool:
            while not ended.is_set():
                try:
                    edits.put(item, timeout=READER_POLL)
                    return True
                except queue.Full:
                    pass
            return False

        def read() -> None:  # a reader thread, so that an idle stream can time out
            try:
                for item in request_iterator:
                    if not offer(item):
                        return
            except MalformedRequest as error:  # the session ends with INVALID_ARGUMENT
                offer(error)
                return
            except Exception:  # noqa: BLE001 - the stream broke or was cancelled: end the session
                pass
            offer(done)

        threading.Thread(target=read, daemon=True, name="type-reader").start()
        try:
            yield from self._edits(edits, done, context)
        finally:
            ended.set()

    def _session(self, engine: Engine) -> TypingSession:
        config = self.config
        return TypingSession(
            engine.suggester, config.max_text_chars, config.session_history, engine.converter, config.max_pinyin_letters
        )

    def _edits(self, edits: queue.Queue, done: object, context) -> Iterator[pb.TypeResponse]:
        count, index = DEFAULT_SUGGESTIONS, 0
        learner: SessionLearner | None = None
        session: TypingSession | None = None
        try:
            while True:
                try:
                    request = edits.get(timeout=self.config.session_idle_timeout)
                except queue.Empty:
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"typing session idle for more than {self.config.session_idle_timeout:g} s; "
                        "the limit is server setting session_idle_timeout",
                    )
                if request is done or not context.is_active():
                    return
                if isinstance(request, MalformedRequest):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"edit {index + 1}: {request}")
                index += 1
                if index == 1:
                    engine = self._engine(request.model, context)
                    session = self._session(engine)
                    learner = self._learner(request.incognito)
                kind = request.WhichOneof("edit")
                try:
                    count = self._num_suggestions(request.num_suggestions, count)
                    apply_edit(session, request, index)
                    candidates = session.convert(max(count, DEFAULT_CANDIDATES), request.fuzzy)
                except (Invalid, EditError, PinyinError) as error:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                if learner is not None and not session.composition:
                    learner.update(session.text, final=kind == "commit")
                if session.composition:  # composing: the candidates are the answer
                    yield pb.TypeResponse(
                        edit_index=index,
                        text_length=len(session.text),
                        composition=session.composition,
                        candidates=to_candidates(self._personal_candidates(session.text, candidates)),
                    )
                    continue
                suggestions = self._personal(engine, session.suggest, session.text, count)
                yield pb.TypeResponse(
                    edit_index=index, text_length=len(session.text), suggestions=to_response(suggestions)
                )
        finally:
            if learner is not None and session is not None:  # the session ended: what remains is finished
                learner.update(session.text, final=True)

    def _learner(self, incognito: bool) -> SessionLearner | None:
        user = current_call.user()
        if user is None or incognito or self.histories is None or not self.histories.learning:
            return None
        return SessionLearner(self.histories, user)

    def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        return self._model_info[self._engine(request.model, context).name]

    def _describe(self, name: str, engine: Engine) -> pb.GetModelInfoResponse:
        """A model and the limits in force: fixed while the server runs, so built once."""
        manifest = engine.artifact.manifest
        return pb.GetModelInfoResponse(
            name=name,
            models=list(self.engines),
            pinyin=engine.converter is not None,
            max_pinyin_letters=self.config.max_pinyin_letters,
            format_version=manifest.format_version,
            tokenizer=manifest.tokenizer.kind,
            vocab_size=manifest.tokenizer.vocab_size,
            cell=manifest.cell,
            num_layers=manifest.num_layers,
            hidden_size=manifest.hidden_size,
            parameters=manifest.parameters,
            stream_validation_perplexity=manifest.provenance.stream_validation_perplexity or 0.0,
            corpus=manifest.provenance.corpus,
            created=manifest.created,
            device=str(engine.model.device),
            max_text_chars=self.config.max_text_chars,
            max_suggestions=self.config.max_suggestions,
            max_generate_tokens=self.config.max_generate_tokens,
            max_context_tokens=self.config.max_context_tokens,
            manifest_json=manifest.to_json(),
            components=["network", "ngram-memory"] if engine.mixed else ["network"],
            ngram_weights=manifest.memory.weights if engine.mixed else [],
            ngram_order=manifest.memory.order if engine.mixed else 0,
            ngram_mix=manifest.memory.rule if engine.mixed else "",
            history_store=self.histories.store.kind if self.histories is not None else "off",
            history_max_entries=self.config.history_max_entries if self.histories is not None else 0,
            learning=self.histories is not None and self.histories.learning,
        )
