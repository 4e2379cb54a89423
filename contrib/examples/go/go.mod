module example.com/cowdisk-client

go 1.19
