"""Opening a link: the one place that picks a link by the broker URL's scheme and, for a
broker cluster that keeps retained messages per node, wraps it in a
:class:`~fedmq.transport.cluster.RetainedFanoutLink`.

Kept apart from :mod:`fedmq.transport.base` so that imports run one way: ``base`` (the
link seam and its registry) <- ``cluster`` (a link over links) <- ``opening``.
"""

from __future__ import annotations

from fedmq.transport.base import Link, Will, link_factory
from fedmq.transport.cluster import RetainedFanoutLink
from fedmq.transport.settings import BrokerSettings


def open_link(settings: BrokerSettings, client_id: str = "", *, will: Will | None = None) -> Link:
    """A new, not yet connected link for ``settings.url``, chosen by its scheme
    (:func:`fedmq.transport.base.register_link`); with ``settings.retain_urls``, a
    :class:`~fedmq.transport.cluster.RetainedFanoutLink` over one link per node.

    Raises:
        ConfigError: no link is registered for the URL's scheme.
    """
    factory = link_factory(settings.url)
    link: Link = (RetainedFanoutLink.open(factory, settings, client_id) if settings.retain_urls
                  else factory(settings, client_id))
    if will is not None:
        link.set_will(will)
    return link
