"""``python -m edge_client run -c FILE``: the edge client CLI without the ``fedmq`` wrapper
(used by the systemd unit and the demo)."""

from edge_client.cli import main

main()
