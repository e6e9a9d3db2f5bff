"""A trained model over a whole slide: heat-maps, tile detections and the slide's score."""
