//! Configuration: TOML schema under upstream paqet's key paths, upstream YAML import, validation.
