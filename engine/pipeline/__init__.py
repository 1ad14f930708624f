"""Pipeline parallelism: schedules as data, the executor, point-to-point communication."""
