"""A minimal plain Channels app on channels_redis: the baseline the benchmarks compare against."""
