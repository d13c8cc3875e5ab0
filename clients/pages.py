"""Every item of a paginated list call, page after page, as one iterator.

    for session in fp.paginate(fp.sessions.ListSessions, ListSessionsRequest(page_size=100)):
        ...

The items are the response's repeated field (`sessions`, `workflows`, ...);
the next page is asked for with the response's `next_page_token` until it
comes back empty. The request passed in is not modified.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from google.protobuf.message import Message


def _items(response: Message) -> Any:
    for field in response.DESCRIPTOR.fields:
        if field.is_repeated and field.message_type is not None:
            return getattr(response, field.name)
    raise TypeError(f"{response.DESCRIPTOR.full_name} has no list of items to page through")


def _first(request: Message) -> Message:
    if "page_token" not in request.DESCRIPTOR.fields_by_name:
        raise TypeError(f"{request.DESCRIPTOR.full_name} is not a paginated list request")
    copy = type(request)()
    copy.CopyFrom(request)
    return copy


def paginate(method: Callable[..., Any], request: Message, **call: Any) -> Iterator[Any]:
    """Items of every page of a sync list call; `call`: extra arguments of each call (timeout=...).

    TypeError at once (not at the first item) for a request that does not paginate.
    """
    return _pages(method, _first(request), call)


def _pages(method: Callable[..., Any], page: Message, call: dict[str, Any]) -> Iterator[Any]:
    while True:
        response = method(page, **call)
        yield from _items(response)
        if not response.next_page_token:
            return
        page.page_token = response.next_page_token  # type: ignore[attr-defined]


def apaginate(method: Callable[..., Awaitable[Any]], request: Message, **call: Any) -> AsyncIterator[Any]:
    """Items of every page of an asyncio list call (TypeError at once for a request that does not paginate)."""
    return _apages(method, _first(request), call)


async def _apages(method: Callable[..., Awaitable[Any]], page: Message, call: dict[str, Any]) -> AsyncIterator[Any]:
    while True:
        response = await method(page, **call)
        for item in _items(response):
            yield item
        if not response.next_page_token:
            return
        page.page_token = response.next_page_token  # type: ignore[attr-defined]
