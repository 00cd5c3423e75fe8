from pipeline.config import stage_main
from pipeline.publish import PublishConfig, run

main = stage_main("publish", PublishConfig)(run)

if __name__ == "__main__":
    main()
