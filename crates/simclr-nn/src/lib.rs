//! Neural-network layers of SimCLR.
