"""fedmq broker tooling: mosquitto configuration, the embedded development broker
(:mod:`broker.embedded`) and launchers for tests and the demo (:mod:`broker.launch`)."""
