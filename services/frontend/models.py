"""Model cards from etcd and the tokenizers they name, loaded once per tokenizer."""

import asyncio
import logging
from collections.abc import Mapping

from proto.messages import ModelCard
from shared.errors import Unavailable
from shared.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class ModelRegistry:
    """The registered models; tokenizers load lazily off the event loop."""

    def __init__(self) -> None:
        self._cards: dict[str, ModelCard] = {}
        self._tokenizers: dict[str, Tokenizer] = {}
        self._load_lock = asyncio.Lock()

    def sync(self, items: Mapping[str, ModelCard]) -> None:
        """Replace the cards with etcd's view (``Discovery.watch_models``)."""
        self._cards = {card.name: card for card in items.values()}

    def card(self, model: str) -> ModelCard | None:
        return self._cards.get(model)

    def cards(self) -> list[ModelCard]:
        return list(self._cards.values())

    async def tokenizer(self, card: ModelCard) -> Tokenizer:
        """The card's tokenizer; the first request loads it in a thread, others wait for it."""
        cached = self._tokenizers.get(card.tokenizer)
        if cached is not None:
            return cached
        async with self._load_lock:
            cached = self._tokenizers.get(card.tokenizer)
            if cached is None:
                try:
                    cached = await asyncio.to_thread(_load, card.tokenizer)
                except (OSError, ValueError) as exc:
                    raise Unavailable(
                        f"tokenizer {card.tokenizer!r} of model {card.name!r} failed to load: {exc}"
                    ) from exc
                self._tokenizers[card.tokenizer] = cached
        return cached


def _load(path: str) -> Tokenizer:
    tokenizer = Tokenizer.load(path)
    _ = tokenizer.byte_table  # built here, in the thread, not on the first request's loop turn
    return tokenizer
