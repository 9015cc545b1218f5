"""conveyor: the client of the conveyor task service. The generated contract lives in `conveyor.v1`."""
