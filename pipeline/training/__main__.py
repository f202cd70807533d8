from pipeline.training.torchrun import main

main()
