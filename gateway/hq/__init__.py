"""Store and head office: the uplink that publishes a store's rows upward as versioned events over MQTT (the
store's Mosquitto bridges them to a central broker), and head office's consumer that writes them, each once,
into one PostgreSQL (docs/scale-out.md)."""
