"""nextword.v1.NextWord: convert protobuf <-> engine objects, and refusals to status codes.

Requests are checked by service/api/validate.py, a call's user gets the engine as they see it
(service/history/for_user.py), and a refusal (``Refused``, or a domain error the engine raises for
bad input) becomes its status code in one place, ``answers``."""

from __future__ import annotations

import functools
import inspect
import queue
import threading
from collections.abc import Iterator

import grpc

from service.api import validate
from service.api.config import ServerConfig
from service.api.messages import to_candidates, to_response
from service.api.parse import MalformedRequest
from service.api.served import ServedModels
from service.api.users import USER_KEY
from service.api.validate import DEFAULT_CANDIDATES, DEFAULT_SUGGESTIONS, Invalid, Refused
from service.history.for_user import PersonalEngine
from service.history.histories import Histories
from service.history.store import RowsRefused, StoreDown
from service.model import current_call
from service.model.engine import Engine
from service.model.generation import END_TOKEN, LENGTH, STOP_STRING
from service.model.personal import units
from service.model.pinyin import Candidate
from service.model.pinyin_lattice import PinyinError
from service.model.typing_session import EditError, EditStream, TypingSession
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

EDIT_QUEUE = 64  # Type edits read ahead of the session
EXPORT_LINES = 500  # history lines per ExportHistory message
MAX_IMPORT_BYTES = 16 << 20  # of history lines in one ImportHistory
FINISH_REASONS = {
    LENGTH: pb.FINISH_REASON_LENGTH,
    END_TOKEN: pb.FINISH_REASON_END_TOKEN,
    STOP_STRING: pb.FINISH_REASON_STOP_STRING,
}
BAD_INPUT = (PinyinError, EditError)  # the engine's word that a request's content is invalid
STORE_DOWN = "the personal-history database is down; try again shortly"


def answers(method):
    """A refusal raised by ``method`` (unary or streaming) ends its call with the refusal's status code."""

    def abort(context, error: Exception):
        if isinstance(error, StoreDown):
            context.abort(grpc.StatusCode.UNAVAILABLE, STORE_DOWN)
        code = error.code if isinstance(error, Refused) else grpc.StatusCode.INVALID_ARGUMENT
        context.abort(code, str(error))

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except (Refused, StoreDown, *BAD_INPUT) as error:
                abort(context, error)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except (Refused, StoreDown, *BAD_INPUT) as error:
            abort(context, error)

    return unary


class NextWordServicer(pb_grpc.NextWordServicer):
    def __init__(
        self, engines: Engine | dict[str, Engine], config: ServerConfig, histories: Histories | None = None
    ) -> None:
        """``engines``: the served models by name, the first answering requests that name none."""
        self.models = ServedModels(engines, config, histories)
        self.config = config
        self.histories = histories  # personal histories (service/history/); None: off
        self._sessions = threading.BoundedSemaphore(config.max_sessions)
        self._active = {"sessions": 0, "generations": 0}
        self._lock = threading.Lock()

    @property
    def engines(self) -> dict[str, Engine]:
        return self.models.engines

    @property
    def engine(self) -> Engine:
        """The model of requests that name none."""
        return self.models.default

    @property
    def active_sessions(self) -> int:
        return self._active["sessions"]

    @property
    def active_generations(self) -> int:
        return self._active["generations"]

    def _count(self, what: str, change: int) -> None:
        with self._lock:
            self._active[what] += change

    def _engine(self, name: str) -> PersonalEngine:
        """The model a request names (empty: the first), as the call's user sees it."""
        engine = self.models.get(name)
        current_call.set_model(engine.name)
        current_call.hold(engine.enter, engine.leave)  # a reload retires this engine after the call
        return PersonalEngine(engine, self.histories, current_call.user())

    def _history_user(self, writes: bool) -> tuple[Histories, str]:
        """The history and the call's user, for the history RPCs."""
        if self.histories is None:
            raise Refused("personal history is off on this server (--history-db off)")
        if writes and not self.histories.learning:
            raise Refused("learning is off on this server (--no-learning)")
        user = current_call.user()
        if user is None:
            raise Invalid(f"this call needs metadata {USER_KEY} naming its user")
        return self.histories, user

    @answers
    def Suggest(self, request: pb.SuggestRequest, context) -> pb.SuggestResponse:
        engine = self._engine(request.model)
        text = validate.text(request.text, "text", self.config)
        count = validate.count(request.num_suggestions, DEFAULT_SUGGESTIONS, self.config)
        return to_response(engine.suggest(functools.partial(engine.engine.suggester.suggest, text), text, count))

    @answers
    def Convert(self, request: pb.ConvertRequest, context) -> pb.ConvertResponse:
        engine = self._engine(request.model)
        converter = engine.engine.converter
        if converter is None:
            raise Refused(
                f"model {engine.engine.name!r} does not read Chinese, so it cannot convert pinyin "
                "(GetModelInfoResponse.pinyin says which models can)"
            )
        text = validate.text(request.context, "context", self.config, required=False)
        letters = validate.pinyin(request.pinyin, self.config)
        count = validate.count(request.num_candidates, DEFAULT_CANDIDATES, self.config, "num_candidates")
        candidates = converter.convert(text, letters, count, request.fuzzy, personal=engine.personal())
        return pb.ConvertResponse(candidates=to_candidates(candidates))

    @answers
    def Learn(self, request: pb.LearnRequest, context) -> pb.LearnResponse:
        histories, user = self._history_user(writes=True)
        text = validate.text(request.text, "text", self.config)
        return pb.LearnResponse(ngrams=histories.learn(user, units(text)))

    @answers
    def Forget(self, request: pb.ForgetRequest, context) -> pb.ForgetResponse:
        histories, user = self._history_user(writes=False)
        return pb.ForgetResponse(removed=histories.forget(user, validate.word_to_forget(request, self.config)))

    @answers
    def ExportHistory(self, request, context) -> Iterator[pb.HistoryChunk]:
        histories, user = self._history_user(writes=False)
        lines = []
        for line in histories.export(user):
            lines.append(line + "\n")
            if len(lines) == EXPORT_LINES:
                yield pb.HistoryChunk(lines="".join(lines))
                lines = []
        if lines:
            yield pb.HistoryChunk(lines="".join(lines))

    @answers
    def ImportHistory(self, request_iterator, context) -> pb.ImportHistoryResponse:
        histories, user = self._history_user(writes=True)
        limit = 10 * self.config.history_max_entries
        lines: list[str] = []
        size = 0
        stream = EditStream(request_iterator, 4, MalformedRequest)
        try:
            while (chunk := self._next_message(stream, self.config.import_idle_timeout, "ImportHistory")) is not None:
                size += len(chunk.lines.encode("utf-8"))
                if size > MAX_IMPORT_BYTES:
                    raise Refused(
                        f"more than {MAX_IMPORT_BYTES >> 20} MiB of history lines; import them in parts",
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
                lines.extend(chunk.lines.splitlines())
                if len(lines) > limit:
                    raise Invalid(f"more than {limit} history lines (10 x history_max_entries); import them in parts")
        finally:
            stream.close()
        try:
            return pb.ImportHistoryResponse(ngrams=histories.import_lines(user, lines))
        except (ValueError, RowsRefused) as error:
            raise Invalid(f"ImportHistory: {error}") from None

    @answers
    def Generate(self, request: pb.GenerateRequest, context) -> Iterator[pb.GenerateResponse]:
        engine = self._engine(request.model)
        prompt = validate.text(request.prompt, "prompt", self.config)
        params = validate.generation(request, self.config)
        self._count("generations", 1)
        try:
            events = engine.engine.generator.generate(
                prompt, params, cancelled=lambda: not context.is_active(), adjust=engine.next_token_mix()
            )
            for event in events:
                if event.finish_reason is None:
                    yield pb.GenerateResponse(text=event.text)
                elif event.finish_reason in FINISH_REASONS:
                    finished = pb.GenerateFinished(
                        reason=FINISH_REASONS[event.finish_reason],
                        prompt_tokens=event.prompt_tokens,
                        generated_tokens=event.generated_tokens,
                    )
                    yield pb.GenerateResponse(finished=finished)
                # cancelled: the client is gone (cancel or deadline), nothing to send
        finally:
            self._count("generations", -1)

    @answers
    def Type(self, request_iterator, context) -> Iterator[pb.TypeResponse]:
        if not self._sessions.acquire(blocking=False):
            raise Refused(
                f"too many typing sessions: the limit is {self.config.max_sessions} at once",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        self._count("sessions", 1)
        stream = EditStream(request_iterator, EDIT_QUEUE, MalformedRequest)
        try:
            yield from self._edits(stream, context)
        finally:
            stream.close()
            self._count("sessions", -1)
            self._sessions.release()

    @staticmethod
    def _next_message(stream: EditStream, idle: float, what: str):
        """The stream's next message, or None at its end; DEADLINE_EXCEEDED after ``idle`` seconds without one."""
        try:
            message = stream.next(idle)
        except queue.Empty:
            setting = "session_idle_timeout" if what == "typing session" else "import_idle_timeout"
            raise Refused(
                f"{what} idle for more than {idle:g} s; the limit is server setting {setting}",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        if isinstance(message, MalformedRequest):
            raise message
        return None if message is EditStream.END else message

    def _next_edit(self, stream: EditStream, index: int):
        try:
            request = self._next_message(stream, self.config.session_idle_timeout, "typing session")
        except MalformedRequest as error:
            raise Invalid(f"edit {index}: {error}") from None
        return EditStream.END if request is None else request

    def _edits(self, stream: EditStream, context) -> Iterator[pb.TypeResponse]:
        count, index = DEFAULT_SUGGESTIONS, 0
        request = self._next_edit(stream, 1)
        if request is EditStream.END or not context.is_active():
            return
        engine = self._engine(request.model)
        config = self.config
        session = TypingSession(
            engine.engine.suggester,
            config.max_text_chars,
            config.session_history,
            engine.engine.converter,
            config.max_pinyin_letters,
        )
        learner = engine.learner(request.incognito, session.next_log_probs)
        try:
            while request is not EditStream.END and context.is_active():
                index += 1
                if request.incognito:  # once set, it stays set: nothing from here on is learned
                    learner = None
                count = validate.count(request.num_suggestions, count, config)
                validate.apply_edit(session, request, index)
                candidates = session.convert(max(count, DEFAULT_CANDIDATES), request.fuzzy, engine.personal())
                if learner is not None and not session.composition:
                    learner.update(session.text, final=request.WhichOneof("edit") == "commit")
                yield self._answer(engine, session, index, count, candidates)
                request = self._next_edit(stream, index + 1)
        finally:
            if learner is not None:  # the session ended: what remains is finished
                learner.update(session.text, final=True)

    def _answer(
        self, engine: PersonalEngine, session: TypingSession, index: int, count: int, candidates: list[Candidate]
    ) -> pb.TypeResponse:
        if session.composition:  # composing: the candidates are the answer
            return pb.TypeResponse(
                edit_index=index,
                text_length=len(session.text),
                composition=session.composition,
                candidates=to_candidates(candidates),
                model_version=engine.engine.version,
            )
        suggestions = engine.suggest(session.suggest, session.text, count)
        return pb.TypeResponse(
            edit_index=index,
            text_length=len(session.text),
            suggestions=to_response(suggestions),
            model_version=engine.engine.version,
        )

    @answers
    def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        return self.models.info(self._engine(request.model).engine.name)
