//! One replica's model: a tract plan with a symbolic batch dimension and a dynamic
//! batcher.
