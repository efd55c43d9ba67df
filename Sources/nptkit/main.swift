print("nptkit")
