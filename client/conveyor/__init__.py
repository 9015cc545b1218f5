"""conveyor: the client of the conveyor task service; the generated contract is `conveyor.v1`."""
