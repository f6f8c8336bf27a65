"""Engine answers as nextword.v1 messages."""

from __future__ import annotations

from service.api.config import ServerConfig
from service.history.histories import Histories
from service.model.engine import Engine
from service.model.pinyin import Candidate
from service.model.suggest import SuggestResult
from service.pb.nextword.v1 import nextword_pb2 as pb


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


def model_info(
    name: str, engine: Engine, engines: dict[str, Engine], config: ServerConfig, histories: Histories | None
) -> pb.GetModelInfoResponse:
    """A model and the limits in force: fixed while the server runs, so built once."""
    manifest = engine.artifact.manifest
    memory = manifest.memory if engine.mixed else None
    return pb.GetModelInfoResponse(
        name=name,
        models=list(engines),
        pinyin=engine.converter is not None,
        max_pinyin_letters=config.max_pinyin_letters,
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
        max_text_chars=config.max_text_chars,
        max_suggestions=config.max_suggestions,
        max_generate_tokens=config.max_generate_tokens,
        max_context_tokens=config.max_context_tokens,
        manifest_json=manifest.to_json(),
        components=["network", "ngram-memory"] if memory is not None else ["network"],
        ngram_weights=memory.weights if memory is not None else [],
        ngram_order=memory.order if memory is not None else 0,
        ngram_mix=memory.rule if memory is not None else "",
        version=engine.version,
        loaded_at=engine.loaded_at,
        history_store=histories.store.kind if histories is not None else "off",
        history_max_entries=config.history_max_entries if histories is not None else 0,
        learning=histories is not None and histories.learning,
    )
