from pipeline.cache import CacheConfig, run
from pipeline.config import stage_main

main = stage_main("cache", CacheConfig)(run)

if __name__ == "__main__":
    main()
