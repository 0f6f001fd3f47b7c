//! The sans-IO routing core: placeholder until the route module lands.
