"""From a path or hub id to a running model: what a path holds, the machine, the choice of
engine and device, the hub, the conversion cache, generation defaults."""
