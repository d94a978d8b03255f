"""Operations: anomaly flags, disputes, reports, metrics export, retention and the warehouse views support staff query."""
