from pipeline.config import stage_main
from pipeline.steer import SteerConfig, run

main = stage_main("steer", SteerConfig)(run)

if __name__ == "__main__":
    main()
