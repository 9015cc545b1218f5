"""Generated code of the conveyor.v1 contract (protos/conveyor/v1). Do not edit."""
