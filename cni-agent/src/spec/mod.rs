//! The CNI specification: versions, configuration, results, errors, environment, verb dispatch and delegation.
