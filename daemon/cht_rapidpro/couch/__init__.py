"""CouchDB access: the typed client and the changes-feed follower."""
