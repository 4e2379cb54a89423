module example.com/cowdisk-bench

go 1.19
