def main(argv=None):
    print("skipconv")
